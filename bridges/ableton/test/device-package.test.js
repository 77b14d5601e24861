// The device's files: CMI.amxd as build-amxd.js makes it (chunks, lengths, patcher JSON, device type,
// patch cords, scripts that exist), the same bytes on every build, and cmi-live.js in Max's ES5 js.
"use strict";

const { describe, it } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const acorn = require("acorn");
const { amxdBytes } = require("../build-amxd.js");

const DEVICE_DIR = path.resolve(__dirname, "..");
const AMXD_PATH = path.join(DEVICE_DIR, "CMI.amxd");
const MIDI_EFFECT_TYPE = 1835887981;

function chunks(bytes) {
  const result = [];
  for (let offset = 0; offset < bytes.length;) {
    const tag = bytes.toString("ascii", offset, offset + 4);
    const length = bytes.readUInt32LE(offset + 4);
    result.push({ tag, offset, data: bytes.subarray(offset + 8, offset + 8 + length) });
    offset += 8 + length;
    assert.ok(offset <= bytes.length, `chunk ${tag} runs past the end of the file`);
  }
  return result;
}

function patcherOf(bytes) {
  const ptch = chunks(bytes).find((chunk) => chunk.tag === "ptch").data;
  assert.equal(ptch[ptch.length - 1], 0, "ptch ends with a NUL byte");
  return JSON.parse(ptch.subarray(0, ptch.length - 1).toString("utf8")).patcher;
}

describe("CMI.amxd", () => {
  const bytes = fs.readFileSync(AMXD_PATH);

  it("is the MIDI effect's chunks with little-endian lengths", () => {
    const found = chunks(bytes);
    assert.deepEqual(found.map((chunk) => chunk.tag), ["ampf", "meta", "ptch"]);
    assert.equal(found[0].data.toString("ascii"), "mmmm");
    assert.deepEqual([...found[1].data], [1, 0, 0, 0]);
    assert.equal(found[2].offset + 8, 32, "a 32-byte header");
  });

  it("holds a patcher whose project says MIDI effect and whose cords join existing ports", () => {
    const patcher = patcherOf(bytes);
    assert.equal(patcher.project.amxdtype, MIDI_EFFECT_TYPE);
    const boxes = new Map(patcher.boxes.map(({ box }) => [box.id, box]));
    assert.equal(boxes.size, patcher.boxes.length, "box ids are unique");
    for (const { patchline } of patcher.lines) {
      const [source, outlet] = patchline.source;
      const [destination, inlet] = patchline.destination;
      assert.ok(outlet < boxes.get(source).numoutlets, `${source} has outlet ${outlet}`);
      assert.ok(inlet < boxes.get(destination).numinlets, `${destination} has inlet ${inlet}`);
    }
    const texts = [...boxes.values()].map((box) => box.text);
    for (const needed of ["midiin", "midiout", "live.thisdevice", "js cmi-live.js"]) assert.ok(texts.includes(needed), needed);
    assert.ok(texts.some((text) => /^node\.script cmi-node\.js/.test(text)));
    for (const label of ["Infill", "Again", "Keep"]) {
      assert.ok([...boxes.values()].some((box) => box.maxclass === "live.text" && box.text === label && box.mode === 0));
    }
  });

  it("refers only to scripts that exist next to it", () => {
    const patcher = patcherOf(bytes);
    const scripts = patcher.boxes.map(({ box }) => /^(?:js|node\.script) (\S+)/.exec(box.text || ""))
      .filter(Boolean).map((match) => match[1]);
    assert.deepEqual(scripts.sort(), ["cmi-live.js", "cmi-node.js"]);
    for (const name of [...scripts, ...patcher.dependency_cache.map((entry) => entry.name)]) {
      assert.ok(fs.existsSync(path.join(DEVICE_DIR, name)), `${name} exists`);
    }
    assert.ok(fs.existsSync(path.join(DEVICE_DIR, "cmi-client.js")), "cmi-node.js needs cmi-client.js");
  });

  it("is what build-amxd.js makes, byte for byte, on every run", () => {
    const built = amxdBytes();
    assert.ok(built.equals(amxdBytes()));
    assert.ok(built.equals(bytes), "CMI.amxd is out of date: run `node build-amxd.js`");
  });
});

describe("cmi-live.js", () => {
  it("parses as ES5, as Max's classic js object needs", () => {
    const code = fs.readFileSync(path.join(DEVICE_DIR, "cmi-live.js"), "utf8");
    assert.doesNotThrow(() => acorn.parse(code, { ecmaVersion: 5, sourceType: "script" }));
  });
});
