// The CMI Max for Live device end to end: cmi-live.js and cmi-node.js wired by the patch cords of
// device-layout.js in a fake Max (test-support/fake-max.js), a fake Live set (test-support/fake-live.js)
// and a live daemon with the shipped default model (test-support/daemon.js).
"use strict";

const { describe, it, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { CmiClient } = require("../cmi-client.js");
const { FakeLiveSet, liveApiClass } = require("../test-support/fake-live.js");
const { FakeDevice } = require("../test-support/fake-max.js");
const { startDaemon } = require("../test-support/daemon.js");

const WAIT_MS = 30000;

async function waitFor(condition, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function melody(count, stepBeats = 1) {
  return Array.from({ length: count }, (_, i) => ({
    pitch: 60 + ((i * 5) % 12), start_time: i * stepBeats, duration: stepBeats / 2, velocity: 90,
  }));
}

// A clip's notes as the fake stores them, keyed by note id (the untouched ones keep theirs).
function snapshot(clip) {
  return clip.props.notes.map(({ selected, ...note }) => note);
}

function notesIn(clip, startBeats, endBeats, inside = true) {
  return snapshot(clip).filter((n) => (n.start_time >= startBeats && n.start_time < endBeats) === inside);
}

function loadDevice(live, track, options) {
  const device = new FakeDevice(liveApiClass(live, live.addDevice(track)), options);
  device.load();
  return device;
}

async function infillAndWait(device, button = "infill") {
  const replies = device.messages("response").length;
  device.press(button);
  await waitFor(() => device.messages("response").length > replies, `${button} to be answered`);
  const reply = device.messages("response").at(-1).body;
  assert.equal(reply.ok, true, JSON.stringify(reply.error));
  return { request: device.messages("request").at(-1).body.content, reply: reply.content };
}

function candidateNotes(reply, index, offsetBeats) {
  return reply.candidates[index].tracks[0].notes
    .map(([startQn, durationQn, pitch, velocity]) => [startQn - offsetBeats, durationQn, pitch, velocity])
    .sort((a, b) => a[0] - b[0] || a[2] - b[2]);
}

function clipNotes(notes) {
  return notes.map((n) => [n.start_time, n.duration, n.pitch, n.velocity]).sort((a, b) => a[0] - b[0] || a[2] - b[2]);
}

async function profileCounts(client) {
  const { profiles } = await client.profiles();
  return profiles.find((p) => p.name === "default") || { accepted: 0, rejected: 0, repeated: 0 };
}

describe("the CMI device in a fake Live, against a live daemon", () => {
  let home;
  let daemon;
  let client;
  const devices = [];
  const live = new FakeLiveSet({ tempoBpm: 100, numerator: 4, denominator: 4 });
  const keys = live.addTrack("Keys");
  const bass = live.addTrack("Bass");
  const sessionClip = live.addSessionClip(keys, melody(16), { lengthBeats: 16, loopStartBeats: 4, loopEndBeats: 8 });
  const arrangementNotes = melody(16).map((note) => ({ ...note, pitch: note.pitch - 24, selected: [5, 6].includes(note.start_time) }));
  const arrangementClip = live.addArrangementClip(bass, arrangementNotes, { lengthBeats: 16, startTimeBeats: 16 });
  let keysDevice;
  let bassDevice;

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "cmi-device-"));
    let connectionFile;
    ({ daemon, connectionFile } = await startDaemon(home));
    process.env.CMI_HOME = home;
    client = new CmiClient({ connectionFile, timeoutMs: 20000 });
    keysDevice = loadDevice(live, keys);
    bassDevice = loadDevice(live, bass);
    devices.push(keysDevice, bassDevice);
  });

  after(() => {
    for (const device of devices) device.remove();
    if (client) client.close();
    if (daemon && daemon.exitCode === null) daemon.kill("SIGKILL");
    fs.rmSync(home, { recursive: true, force: true });
  });

  it("shows the connection and the model once loaded", async () => {
    await waitFor(() => keysDevice.statusText.startsWith("connected"), "the status line");
    assert.match(keysDevice.statusText, /^connected, model default, last \d+ ms$/);
    const ready = keysDevice.traffic.findIndex((t) => t.from === "node" && t.atoms[0] === "ready");
    assert.ok(ready >= 0, "the node part says when it runs");
    await waitFor(() => keysDevice.messages("response").length === 2, "the hello sent again on ready");
    assert.deepEqual(keysDevice.messages("request").map((r) => r.body.type), ["hello", "hello"]);
  });

  it("infills the session clip's loop: new notes inside, the rest untouched, in one burst", async () => {
    live.showClip(sessionClip);
    keysDevice.turnTemperature(0.5);
    const outside = notesIn(sessionClip, 4, 8, false);
    const { request, reply } = await infillAndWait(keysDevice);
    assert.deepEqual(request.range, [4, 8]);
    assert.deepEqual(request.tempo, [[0, 100]]);
    assert.deepEqual(request.time_signatures, [[0, 4, 4]]);
    assert.equal(request.options.temperature, 0.5);
    assert.deepEqual(request.tracks[0].notes.slice(0, 2), [[0, 0.5, 60, 90], [1, 0.5, 65, 90]]);
    assert.equal(request.tracks[0].name, "Keys");
    assert.deepEqual(notesIn(sessionClip, 4, 8, false), outside);
    assert.deepEqual(clipNotes(notesIn(sessionClip, 4, 8)), candidateNotes(reply, 0, 0));
    const written = reply.candidates[0].tracks[0].notes.length ? ["remove_notes_extended", "add_new_notes"]
      : ["remove_notes_extended"];
    assert.deepEqual(live.calls.slice(-written.length).map((call) => call.name), written);
    assert.equal(keysDevice.menuItems.length, 3);
    assert.equal(keysDevice.menuIndex, 0);
    assert.match(keysDevice.statusText, /candidate 1 of 3$/);
  });

  it("writes the candidate chosen in the menu", async () => {
    const { content } = keysDevice.messages("response").at(-1).body;
    keysDevice.chooseCandidate(2);
    assert.deepEqual(clipNotes(notesIn(sessionClip, 4, 8)), candidateNotes(content, 2, 0));
    assert.match(keysDevice.statusText, /candidate 3 of 3$/);
  });

  it("Again infills the same range of the same session: the daemon counts a repeat", async () => {
    const before = await profileCounts(client);
    const first = keysDevice.messages("request").at(-1).body.content;
    const { request } = await infillAndWait(keysDevice, "again");
    assert.equal(request.session, first.session);
    assert.deepEqual(request.range, first.range);
    assert.equal((await profileCounts(client)).repeated, before.repeated + 1);
  });

  it("Keep sends accept for the candidate shown", async () => {
    const before = await profileCounts(client);
    keysDevice.chooseCandidate(1);
    const { request } = await infillAndWait(keysDevice, "keep");
    assert.deepEqual(request, { session: keysDevice.messages("request").at(-2).body.content.session,
      verdict: "accept", candidate: 1 });
    assert.equal((await profileCounts(client)).accepted, before.accepted + 1);
    assert.match(keysDevice.statusText, /kept candidate 2$/);
  });

  it("infills the bars of the selected notes in an arrangement clip, with a second device at once", async () => {
    live.showClip(sessionClip);
    const keysReplies = keysDevice.messages("response").length;
    keysDevice.press("infill");
    live.showClip(arrangementClip);
    const outside = notesIn(arrangementClip, 4, 8, false);
    const { request, reply } = await infillAndWait(bassDevice);
    assert.deepEqual(request.range, [20, 24], "clip beats 4-8 of a clip starting at song beat 16");
    assert.deepEqual(request.tracks[0].notes[0], [16, 0.5, 36, 90]);
    assert.deepEqual(notesIn(arrangementClip, 4, 8, false), outside);
    assert.deepEqual(clipNotes(notesIn(arrangementClip, 4, 8)), candidateNotes(reply, 0, 16));
    await waitFor(() => keysDevice.messages("response").length > keysReplies, "the keys device's infill");
    const sessions = [keysDevice, bassDevice].map((d) => d.messages("request").at(-1).body.content.session);
    assert.notEqual(sessions[0], sessions[1]);
  });

  it("sends a large clip in chunks under the message cap", async () => {
    const big = live.addSessionClip(keys, melody(3000, 0.25), { lengthBeats: 750, loopStartBeats: 16, loopEndBeats: 20 });
    live.showClip(big);
    const outside = notesIn(big, 16, 20, false);
    const { reply } = await infillAndWait(keysDevice);
    const sent = keysDevice.messages("request").at(-1);
    assert.ok(sent.chunkCount > 1, `${sent.chunkCount} chunk(s)`);
    assert.deepEqual(notesIn(big, 16, 20, false), outside);
    assert.deepEqual(clipNotes(notesIn(big, 16, 20)), candidateNotes(reply, 0, 0));
  });

  it("refuses a clip of another track and changes nothing", () => {
    live.showClip(arrangementClip);
    const notes = snapshot(arrangementClip);
    const requests = keysDevice.messages("request").length;
    keysDevice.press("infill");
    assert.match(keysDevice.statusText, /on another track/);
    assert.equal(keysDevice.messages("request").length, requests);
    assert.deepEqual(snapshot(arrangementClip), notes);
  });

  it("shows a daemon that is down in the status line and changes nothing", async () => {
    const empty = fs.mkdtempSync(path.join(os.tmpdir(), "cmi-nodaemon-"));
    process.env.CMI_HOME = empty;
    try {
      const lonely = live.addTrack("Lonely");
      const clip = live.addSessionClip(lonely, melody(8), { lengthBeats: 8 });
      const device = loadDevice(live, lonely);
      devices.push(device);
      await waitFor(() => device.statusText.startsWith("not connected"), "the status line");
      assert.equal(device.statusText, "not connected: the CMI daemon is not running: start it with cmi-daemon start");
      assert.match(device.posts.at(-1), /^CMI: not_running: .*no connection file at/);
      live.showClip(clip);
      const notes = snapshot(clip);
      const replies = device.messages("response").length;
      device.press("infill");
      await waitFor(() => device.messages("response").length > replies, "the infill's answer");
      assert.equal(device.messages("response").at(-1).body.error.code, "not_running");
      assert.match(device.statusText, /^not connected: /);
      assert.deepEqual(snapshot(clip), notes);
      device.press("keep");
      assert.match(device.statusText, /press Infill first/);
    } finally {
      process.env.CMI_HOME = home;
      fs.rmSync(empty, { recursive: true, force: true });
    }
  });

  it("times a request out when the node part does not answer, and changes nothing", async () => {
    const silent = live.addTrack("Silent");
    const clip = live.addSessionClip(silent, melody(8), { lengthBeats: 8 });
    const device = loadDevice(live, silent, { nodeRunning: false, taskTimeScale: 0.001 });
    await waitFor(() => device.statusText !== "", "the hello to time out");
    assert.match(device.statusText, /^not connected: no answer from the device's node\.script/);
    live.showClip(clip);
    const notes = snapshot(clip);
    device.press("infill");
    assert.match(device.statusText, /infilling beats 0-8/);
    await waitFor(() => !/infilling/.test(device.statusText), "the infill to time out");
    assert.match(device.statusText, /^not connected: no answer from the device's node\.script/);
    assert.deepEqual(snapshot(clip), notes);
  });
});
