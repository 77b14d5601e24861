// The Node client against a live daemon: `python -m cmi_daemon.cli.main start` with a temporary CMI_HOME
// and the shipped default model (the real engine), started by test-support/daemon.js.
"use strict";

const { describe, it, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");
const {
  CmiClient, CmiEvents, DaemonError, DaemonNotRunning, DaemonTimeout, defaultConnectionFile, loadConnection, sign,
} = require("../cmi-client.js");
const { startDaemon } = require("../test-support/daemon.js");

function infillContent(session = "live-set:clip-1:8-12", options = {}) {
  const melody = Array.from({ length: 16 }, (_, qn) => [qn, 0.5, 60 + ((qn * 5) % 12), 90]);
  const bass = Array.from({ length: 8 }, (_, i) => [i * 2, 2, 36 + (i % 5), 80]);
  return {
    session,
    tracks: [{ name: "Keys", program: 0, drum: false, notes: melody }, { name: "Bass", program: 33, notes: bass }],
    tempo: [[0, 120]],
    time_signatures: [[0, 4, 4]],
    range: [8, 12],
    targets: [0],
    options: { candidates: 2, seed: 3, ...options },
  };
}

function checkReply(reply, content) {
  assert.equal(reply.session, content.session);
  assert.equal(reply.candidates.length, content.options.candidates);
  for (const candidate of reply.candidates) {
    assert.deepEqual(candidate.tracks.map((t) => t.track), content.targets);
    for (const [start, duration, pitch, velocity] of candidate.tracks[0].notes) {
      assert.ok(start >= content.range[0] && start < content.range[1] && duration > 0);
      assert.ok(pitch >= 0 && pitch <= 127 && velocity >= 1 && velocity <= 127);
    }
  }
}

describe("cmi-client against a live daemon", () => {
  let home;
  let daemon;
  let connectionFile;
  let client;

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "cmi-node-"));
    ({ daemon, connectionFile } = await startDaemon(home));
    client = new CmiClient({ connectionFile, timeoutMs: 20000 });
  });

  after(() => {
    if (client) client.close();
    if (daemon && daemon.exitCode === null) daemon.kill("SIGKILL");
    fs.rmSync(home, { recursive: true, force: true });
  });

  it("finds the connection file where the protocol says", () => {
    assert.equal(defaultConnectionFile({ CMI_HOME: home }), connectionFile);
    assert.equal(defaultConnectionFile({}, "linux", "/home/a"), "/home/a/.local/state/cmi/connection.json");
    assert.equal(defaultConnectionFile({ XDG_STATE_HOME: "/s" }, "linux", "/h"), "/s/cmi/connection.json");
    assert.equal(defaultConnectionFile({}, "darwin", "/Users/a"),
      "/Users/a/Library/Application Support/cmi/connection.json");
    assert.equal((fs.statSync(connectionFile).mode & 0o777), 0o600);
  });

  it("says hello and reports status", async () => {
    const hello = await client.hello();
    assert.equal(hello.protocol, "1.2");
    assert.ok(hello.capabilities.includes("infill"));
    const status = await client.status();
    assert.equal(status.pid, daemon.pid);
    assert.equal(status.model.name, "default");
  });

  it("infills with the real engine and matches concurrent replies by id", async () => {
    const contents = [0, 1, 2, 3].map((i) => infillContent(`clip-${i}:8-12`, { seed: i }));
    const [status, ...replies] = await Promise.all([client.status(), ...contents.map((c) => client.infill(c))]);
    assert.ok(["idle", "busy"].includes(status.state));
    replies.forEach((reply, i) => checkReply(reply, contents[i]));
    const again = await client.infill(contents[2]);
    assert.deepEqual(again.candidates, replies[2].candidates, "same seed, same notes");
  });

  it("publishes progress events", async () => {
    const topics = [];
    const events = new CmiEvents(client.connection, ["progress."], (topic, event) => topics.push([topic, event]));
    await new Promise((resolve) => setTimeout(resolve, 300));
    await client.infill(infillContent("events:8-12"), { id: "with-events" });
    await new Promise((resolve) => setTimeout(resolve, 200));
    events.close();
    assert.ok(topics.length >= 2);
    assert.ok(topics.every(([topic]) => topic === "progress.with-events"));
    assert.equal(topics[topics.length - 1][1].content.stage, "done");
  });

  it("waits the daemon's own request timeout, asked with hello, for an infill without timeout_ms", async () => {
    const waits = [];
    const request = client.request.bind(client);
    client.request = (type, content, options = {}) => {
      waits.push([type, options.timeoutMs]);
      return request(type, content, options);
    };
    const content = infillContent("no-timeout:8-12");
    try {
      checkReply(await client.infill(content), content);
    } finally {
      delete client.request;
    }
    const { limits } = await client.hello();
    assert.deepEqual(waits.map(([type]) => type), ["hello", "infill"]);
    assert.ok(waits[1][1] > limits.request_timeout_ms && waits[1][1] < limits.max_timeout_ms, `waited ${waits[1][1]} ms`);
  });

  it("names the invalid field", async () => {
    const content = infillContent();
    content.tracks[0].notes[3][2] = 200;
    await assert.rejects(client.infill(content), (error) => error instanceof DaemonError
      && error.code === "invalid_field" && error.field === "content.tracks[0].notes[3][2]");
    const backwards = { ...infillContent(), range: [12, 8] };
    await assert.rejects(client.infill(backwards), { code: "invalid_field", field: "content.range" });
  });

  it("records feedback for a session", async () => {
    const content = infillContent("feedback:8-12");
    await client.infill(content);
    const reply = await client.feedback(content.session, "accept", 1);
    assert.deepEqual(reply, { session: content.session, verdict: "accept", profile: "default" });
    await assert.rejects(client.feedback("unknown", "reject"), { code: "not_found" });
  });

  it("gets bad_signature for a wrong key", async () => {
    const socket = new zmq.Dealer({ linger: 0 });
    socket.connect(client.connection.request_endpoint);
    const body = Buffer.from(encode({ protocol: "1.0", id: "x", type: "status", content: {} }));
    await socket.send([sign("0".repeat(64), body), body]);
    const [, replyBody] = await socket.receive();
    const reply = decode(replyBody);
    socket.close();
    assert.equal(reply.ok, false);
    assert.equal(reply.id, null);
    assert.equal(reply.error.code, "bad_signature");
  });

  it("times out when nothing answers", async () => {
    const silent = new CmiClient({
      connection: { ...client.connection, pid: process.pid, request_endpoint: "tcp://127.0.0.1:9" },
      timeoutMs: 300,
    });
    await assert.rejects(silent.status(), DaemonTimeout);
    silent.close();
  });

  it("reports a daemon that is not running", async () => {
    assert.throws(() => loadConnection(path.join(home, "missing.json")),
      (error) => error instanceof DaemonNotRunning && /cmi-daemon start/.test(error.message));
    assert.deepEqual(await client.shutdown(), { stopping: true });
    await new Promise((resolve) => daemon.once("exit", resolve));
    assert.equal(daemon.exitCode, 0);
    assert.throws(() => loadConnection(connectionFile), DaemonNotRunning);
    const stale = path.join(home, "stale.json");
    fs.writeFileSync(stale, JSON.stringify({ ...client.connection, pid: daemon.pid }));
    assert.throws(() => loadConnection(stale), /has ended/);
  });
});
