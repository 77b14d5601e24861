// Builds CMI.amxd, the CMI Max for Live MIDI effect, from device-layout.js: the same bytes on every run.
// The .amxd is a list of chunks (4-byte ASCII tag, little-endian uint32 length, data): `ampf` with the
// device type, `meta`, then `ptch` with the patcher as UTF-8 JSON ending in a NUL byte.
// Usage: node build-amxd.js [OUT.amxd]   (default: CMI.amxd next to this script)
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const layout = require("./device-layout.js");

const DEVICE_TYPES = { mmmm: 1835887981 };
const META_DATA = Buffer.from([1, 0, 0, 0]);
const BOX_SIZE_PX = { width: 120, height: 22 };

// Inlets and outlets of the Max objects the layout uses (Max recounts them when it loads a patcher).
const OBJECT_PORTS = {
  midiin: [1, ["int"]],
  midiout: [1, []],
  "live.thisdevice": [1, ["bang", "int", "int"]],
  prepend: [1, [""]],
  js: [1, [""]],
  "node.script": [1, ["", ""]],
};

function liveParameter(box, type, extra) {
  return {
    parameter_enable: 1,
    varname: box.id,
    saved_attribute_attributes: {
      valueof: { parameter_longname: box.label, parameter_shortname: box.label, parameter_type: type, ...extra },
    },
  };
}

function uiFields(box) {
  switch (box.ui) {
    case "live.text":
      return { maxclass: "live.text", text: box.label, texton: box.label, mode: 0, numinlets: 1, numoutlets: 2,
        outlettype: ["", ""], ...liveParameter(box, 2, { parameter_enum: ["val1", "val2"], parameter_mmax: 1 }) };
    case "live.dial":
      return { maxclass: "live.dial", numinlets: 1, numoutlets: 2, outlettype: ["", "float"],
        ...liveParameter(box, 0, { parameter_mmin: box.range[0], parameter_mmax: box.range[1],
          parameter_initial: [box.initial], parameter_initial_enable: 1, parameter_unitstyle: 1 }) };
    case "live.menu":
      return { maxclass: "live.menu", numinlets: 1, numoutlets: 3, outlettype: ["", "", "float"],
        ...liveParameter(box, 2, { parameter_enum: box.items, parameter_mmax: box.items.length - 1 }) };
    case "umenu":
      return { maxclass: "umenu", items: [], numinlets: 1, numoutlets: 3, outlettype: ["int", "", ""],
        parameter_enable: 0, varname: box.id };
    case "comment":
      return { maxclass: "comment", text: box.label, linecount: 2, numinlets: 1, numoutlets: 0 };
    default:
      throw new Error(`device-layout.js: unknown UI object ${box.ui}`);
  }
}

function objectFields(box) {
  if (box.message !== undefined) {
    return { maxclass: "message", text: box.message, numinlets: 2, numoutlets: 1, outlettype: [""] };
  }
  if (box.ui) return uiFields(box);
  const name = box.text.split(" ")[0];
  const ports = OBJECT_PORTS[name];
  if (!ports) throw new Error(`device-layout.js: unknown Max object ${name}`);
  const outlettype = box.outlets ? new Array(box.outlets).fill("") : ports[1];
  return { maxclass: "newobj", text: box.text, numinlets: ports[0], numoutlets: outlettype.length, outlettype };
}

function boxJson(box) {
  const fields = { id: box.id, ...objectFields(box),
    patching_rect: [box.at[0], box.at[1], BOX_SIZE_PX.width, BOX_SIZE_PX.height] };
  if (box.view) Object.assign(fields, { presentation: 1, presentation_rect: box.view });
  return { box: fields };
}

function lineJson([source, outlet, destination, inlet]) {
  return { patchline: { source: [source, outlet], destination: [destination, inlet] } };
}

function patcherJson(description = layout) {
  const ids = new Set(description.boxes.map((box) => box.id));
  for (const [source, , destination] of description.cords) {
    if (!ids.has(source) || !ids.has(destination)) throw new Error(`cord ${source} -> ${destination}: no such box`);
  }
  return {
    patcher: {
      fileversion: 1,
      appversion: { major: 8, minor: 5, revision: 0, architecture: "x64", modernui: 1 },
      classnamespace: "box",
      rect: [100, 100, 800, 400],
      openinpresentation: 1,
      default_fontsize: 10.0,
      default_fontface: 0,
      default_fontname: "Arial Bold",
      gridsize: [8, 8],
      description: "CMI: infill bars of the shown MIDI clip with the CMI daemon",
      boxes: description.boxes.map(boxJson),
      lines: description.cords.map(lineJson),
      dependency_cache: description.scripts.map((name) => ({ name, type: "TEXT", implicit: 1 })),
      latency: 0,
      is_mpe: 0,
      project: {
        version: 1,
        viewrect: [0, 0, 300, 500],
        autoorganize: 1,
        hideprojectwindow: 1,
        showdependencies: 1,
        autolocalize: 0,
        contents: { patchers: {} },
        layout: {},
        searchpath: {},
        detailsvisible: 0,
        amxdtype: DEVICE_TYPES[description.amxdType],
        readonly: 0,
        devpathtype: 0,
        devpath: ".",
        sortmode: 0,
        viewmode: 0,
        includepackages: 0,
      },
      autosave: 0,
    },
  };
}

function chunk(tag, data) {
  const header = Buffer.alloc(8);
  header.write(tag, 0, "ascii");
  header.writeUInt32LE(data.length, 4);
  return Buffer.concat([header, data]);
}

function amxdBytes(description = layout) {
  const patcher = Buffer.from(`${JSON.stringify(patcherJson(description), null, "\t")}\n\0`, "utf8");
  return Buffer.concat([
    chunk("ampf", Buffer.from(description.amxdType, "ascii")),
    chunk("meta", META_DATA),
    chunk("ptch", patcher),
  ]);
}

function main(outPath = path.join(__dirname, `${layout.name}.amxd`)) {
  fs.writeFileSync(outPath, amxdBytes());
  console.log(`wrote ${outPath}`);
}

if (require.main === module) main(process.argv[2]);

module.exports = { amxdBytes, patcherJson };
