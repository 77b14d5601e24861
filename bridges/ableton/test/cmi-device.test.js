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

// The clip's notes without their note ids, which notes put back get anew.
function withoutIds(clip) {
  return snapshot(clip).map(({ note_id, ...note }) => note)
    .sort((a, b) => a.start_time - b.start_time || a.pitch - b.pitch);
}

// Notes of `pitches` every stepBeats from 0 to lengthBeats.
function chords(lengthBeats, stepBeats, pitches) {
  const notes = [];
  for (let beats = 0; beats < lengthBeats; beats += stepBeats) {
    for (const pitch of pitches) notes.push({ pitch, start_time: beats, duration: stepBeats / 2, velocity: 90 });
  }
  return notes;
}

function loadDevice(live, track, options) {
  const device = new FakeDevice(liveApiClass(live, live.addDevice(track)), options);
  device.load();
  return device;
}

// A device loaded on the track once both its hellos (on load, and when Node is ready) are answered.
async function connectedDevice(live, track) {
  const device = loadDevice(live, track);
  await waitFor(() => device.messages("response").length === 2, "the hellos on load and on ready");
  assert.match(device.statusText, /^connected/);
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

  it("infills the session clip's loop: new notes inside, the rest untouched, nothing removed before Live takes one", async () => {
    live.showClip(sessionClip);
    keysDevice.turnTemperature(0.5);
    const outside = notesIn(sessionClip, 4, 8, false);
    const inside = notesIn(sessionClip, 4, 8);
    const { request, reply } = await infillAndWait(keysDevice);
    assert.deepEqual(request.range, [4, 8]);
    assert.deepEqual(request.tempo, [[0, 100]]);
    assert.deepEqual(request.time_signatures, [[0, 4, 4]]);
    assert.equal(request.options.temperature, 0.5);
    assert.equal(request.options.follow_repeat, 1, "the repeats dial at rest follows the song's repeats");
    assert.deepEqual(request.tracks[0].notes.slice(0, 2), [[0, 0.5, 60, 90], [1, 0.5, 65, 90]]);
    assert.equal(request.tracks[0].name, "Keys");
    assert.deepEqual(notesIn(sessionClip, 4, 8, false), outside);
    assert.deepEqual(clipNotes(notesIn(sessionClip, 4, 8)), candidateNotes(reply, 0, 0));
    const written = reply.candidates[0].tracks[0].notes.length
      ? ["get_notes_extended", "add_new_notes", "get_notes_extended", "remove_notes_extended", "add_new_notes",
        "get_notes_extended"]
      : ["get_notes_extended", "remove_notes_extended"];
    assert.deepEqual(live.calls.slice(-written.length).map((call) => call.name), written);
    const probe = live.calls.at(-5).args[0];
    const probeNotes = (typeof probe === "string" ? JSON.parse(probe) : probe).notes;
    assert.equal(probeNotes.length, 1, "one new note goes in before the range is emptied");
    const coincides = (note) => inside.some((o) => o.pitch === note.pitch && o.start_time === note.start_time);
    const candidate = candidateNotes(reply, 0, 0).map(([start_time, , pitch]) => ({ start_time, pitch }));
    if (candidate.some((note) => !coincides(note))) {
      assert.ok(!coincides(probeNotes[0]), "the first note added does not start on a note of its pitch");
    }
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

  it("sends hello's context bars around the range of a large clip, in chunks under the message cap", async () => {
    const big = live.addSessionClip(keys, chords(800, 0.125, [60, 64, 67]), { lengthBeats: 800, loopStartBeats: 400,
      loopEndBeats: 404 });
    live.showClip(big);
    const outside = notesIn(big, 400, 404, false);
    const before = snapshot(big);
    const { request, reply } = await infillAndWait(keysDevice);
    const sent = keysDevice.messages("request").at(-1);
    assert.ok(sent.chunkCount > 1, `${sent.chunkCount} chunk(s)`);
    const { limits } = keysDevice.messages("response").find((r) => r.body.content.limits).body.content;
    const [fromBeats, toBeats] = [400 - 4 * limits.context_bars, 404 + 4 * limits.context_bars];
    assert.ok(fromBeats > 0 && toBeats < 800, `the clip reaches past beats ${fromBeats}-${toBeats}`);
    assert.deepEqual(request.tracks[0].notes, clipNotes(before.filter((n) => n.start_time >= fromBeats
      && n.start_time < toBeats)), `the notes of beats ${fromBeats}-${toBeats} only`);
    assert.deepEqual(notesIn(big, 400, 404, false), outside);
    assert.deepEqual(clipNotes(notesIn(big, 400, 404)), candidateNotes(reply, 0, 0));
  });

  for (const [refused, how] of [[["string"], "throw"], [["string"], "silent"]]) {
    it(`writes the candidate in the other form when Live refuses ${refused[0]} arguments (${how})`, async () => {
      const track = live.addTrack(`Refuses ${refused[0]}`);
      const clip = live.addSessionClip(track, melody(16), { lengthBeats: 16, loopStartBeats: 4, loopEndBeats: 8 });
      const device = await connectedDevice(live, track);
      devices.push(device);
      live.showClip(clip);
      const outside = notesIn(clip, 4, 8, false);
      live.refuseNotes(refused, { how });
      try {
        const { reply } = await infillAndWait(device);
        assert.deepEqual(notesIn(clip, 4, 8, false), outside);
        assert.deepEqual(clipNotes(notesIn(clip, 4, 8)), candidateNotes(reply, 0, 0));
        assert.match(device.statusText, /candidate 1 of 3$/);
      } finally {
        live.refuseNotes(null);
      }
    });
  }

  it("keeps every note, ids and all, when Live refuses both argument forms", async () => {
    live.showClip(sessionClip);
    const notes = snapshot(sessionClip);
    live.refuseNotes(["string", "object"]);
    try {
      await infillAndWait(keysDevice, "again");
    } finally {
      live.refuseNotes(null);
    }
    assert.deepEqual(snapshot(sessionClip), notes);
    assert.match(keysDevice.statusText, /Live refused the new notes; your notes are as they were/);
    assert.match(keysDevice.posts.at(-1), /a JSON string: .*invalid syntax.*an object: .*invalid syntax.*nothing was removed/);
    keysDevice.press("keep");
    assert.match(keysDevice.statusText, /no candidate is in the clip/);
  });

  it("puts the notes back when Live takes one new note but not the candidate", async () => {
    const track = live.addTrack("Takes one");
    const around = melody(32, 0.5).filter((n) => n.start_time < 8 || n.start_time >= 12 || n.start_time === 8);
    const clip = live.addSessionClip(track, around, { lengthBeats: 16, loopStartBeats: 8, loopEndBeats: 12 });
    const device = await connectedDevice(live, track);
    devices.push(device);
    live.showClip(clip);
    const notes = withoutIds(clip);
    assert.equal(notesIn(clip, 8, 12).length, 1);
    live.refuseNotes(["string", "object"], { minNotes: 2 });
    device.turn("density", 2); // the bars hold one note: ask for 2 a beat, so the candidate surely holds more
    let reply;
    try {
      ({ reply } = await infillAndWait(device));
    } finally {
      live.refuseNotes(null);
      device.turn("density", 0);
    }
    assert.ok(reply.candidates[0].tracks[0].notes.length >= 2, "the candidate should hold 2 notes or more");
    assert.deepEqual(withoutIds(clip), notes);
    assert.match(device.statusText, /Live refused the new notes; your notes are as they were/);
    assert.match(device.posts.at(-1), /Live refused the new notes \(add_new_notes with a JSON string: .*invalid syntax/);
  });

  it("sends the controls its dials set, and the new notes keep to them", async () => {
    live.showClip(sessionClip);
    const { request: free } = await infillAndWait(keysDevice);
    assert.equal(free.options.controls, undefined, "dials at rest leave every control to the clip");
    assert.equal(free.tracks[0].drum, false);
    for (const [dial, value] of [["polyphony", 1], ["low", 62], ["high", 70], ["grid", 4], ["length", 0.5],
      ["vello", 100], ["repeats", 0]]) {
      keysDevice.turn(dial, value);
    }
    try {
      const { request, reply } = await infillAndWait(keysDevice);
      assert.equal(request.options.follow_repeat, 0);
      assert.deepEqual(request.options.controls,
        [{ track: 0, max_polyphony: 1, pitch_range: [62, 70], velocity_range: [100, 127], grid: "1/8T",
          note_length_qn: 0.5 }]);
      const notes = candidateNotes(reply, 0, 0);
      assert.ok(notes.length > 0, "the candidate should hold notes");
      for (const [start, duration, pitch, velocity] of notes) {
        assert.ok(pitch >= 62 && pitch <= 70, `pitch ${pitch} outside 62-70`);
        assert.ok(velocity >= 98, `velocity ${velocity} below the velocity bin of 100`);
        assert.ok(Math.abs(start * 3 - Math.round(start * 3)) < 1e-6, `onset ${start} off the 1/8T grid`);
        assert.ok(duration > 0);
      }
      for (let i = 1; i < notes.length; i++) {
        assert.ok(notes[i - 1][0] + notes[i - 1][1] <= notes[i][0] + 1e-6, "two notes at once with polyphony 1");
      }
    } finally {
      for (const [dial, value] of [["polyphony", 0], ["low", 0], ["high", 127], ["grid", 0], ["length", 0],
        ["vello", 1], ["repeats", 1]]) {
        keysDevice.turn(dial, value);
      }
    }
  });

  it("tells the daemon a track whose first instrument is a Drum Rack plays drums", async () => {
    const beat = live.addTrack("Beat");
    const beatClip = live.addSessionClip(beat, melody(16).map((note) => ({ ...note, pitch: 36 + (note.pitch % 3) })),
      { lengthBeats: 16, loopStartBeats: 4, loopEndBeats: 8 });
    const beatDevice = await connectedDevice(live, beat);
    devices.push(beatDevice);
    live.addInstrument(beat, { drumRack: true });
    live.addInstrument(beat);
    live.showClip(beatClip);
    const { request } = await infillAndWait(beatDevice);
    assert.equal(request.tracks[0].drum, true);
  });

  it("sends a zero-length note as it is, for the daemon's degenerate-note rule", async () => {
    const hits = live.addTrack("Hits");
    const hitNotes = melody(16).map((note) => ({ ...note, duration: note.start_time === 2 ? 0 : note.duration }));
    const hitClip = live.addSessionClip(hits, hitNotes, { lengthBeats: 16, loopStartBeats: 4, loopEndBeats: 8 });
    const hitsDevice = await connectedDevice(live, hits);
    devices.push(hitsDevice);
    live.showClip(hitClip);
    const { request } = await infillAndWait(hitsDevice);
    assert.ok(request.tracks[0].notes.some(([start, duration]) => start === 2 && duration === 0));
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
    const sent = device.traffic.length;
    device.press("infill");
    await waitFor(() => device.traffic.length > sent, "the press to be handled");
    const requests = device.traffic.slice(sent).filter((t) => t.atoms[0] === "request");
    assert.equal(requests.length, 1);
    assert.equal(JSON.parse(requests[0].atoms[4].slice(1)).type, "hello", "no limits known yet: hello first");
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.match(device.statusText, /^not connected: no answer from the device's node\.script/);
    assert.deepEqual(snapshot(clip), notes);
  });
});

describe("the CMI device against a daemon whose config sets smaller limits", () => {
  let home;
  let daemon;
  let device;
  const live = new FakeLiveSet({ tempoBpm: 120, numerator: 4, denominator: 4 });
  const track = live.addTrack("Keys");
  const dense = live.addSessionClip(track, melody(64, 0.5), { lengthBeats: 32, loopStartBeats: 8, loopEndBeats: 20 });
  const sparse = live.addSessionClip(track, melody(16), { lengthBeats: 16, loopStartBeats: 4, loopEndBeats: 8 });

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "cmi-device-limits-"));
    fs.mkdirSync(path.join(home, "config"));
    fs.writeFileSync(path.join(home, "config", "config.toml"),
      "[daemon]\nrequest_timeout_ms = 20000\n[limits]\nmax_range_qn = 8\nmax_notes = 60\nmax_candidates = 2\n");
    ({ daemon } = await startDaemon(home));
    process.env.CMI_HOME = home;
    device = await connectedDevice(live, track);
  });

  after(() => {
    if (device) device.remove();
    if (daemon && daemon.exitCode === null) daemon.kill("SIGKILL");
    fs.rmSync(home, { recursive: true, force: true });
  });

  it("refuses a range or a note count over hello's limits, saying so, and sends nothing", () => {
    live.showClip(dense);
    const notes = snapshot(dense);
    const requests = device.messages("request").length;
    device.press("infill");
    assert.match(device.statusText, /the range is 12 beats; CMI infills at most 8 at once/);
    dense.props.loop_end = 12;
    device.press("infill");
    assert.match(device.statusText, /the clip holds 64 notes in and around the range; CMI takes at most 60 at once/);
    assert.equal(device.messages("request").length, requests);
    assert.deepEqual(snapshot(dense), notes);
  });

  it("asks for no more candidates than the daemon gives and waits its request timeout", async () => {
    live.showClip(sparse);
    const { request, reply } = await infillAndWait(device);
    assert.equal(request.options.candidates, 2);
    assert.equal(request.timeout_ms, 20000);
    assert.equal(reply.candidates.length, 2);
    assert.equal(device.menuItems.length, 2);
  });
});
