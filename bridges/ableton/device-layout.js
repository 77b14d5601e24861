// The CMI Max for Live device's patcher in readable form: its objects and patch cords.
// build-amxd.js turns it into CMI.amxd; the tests run the same patch cords in a fake Max.
//
// A box is a Max object (`text`), a message box (`message`) or a UI object (`ui` with a `label`);
// `at` is its place in the patching view, `view` its [x, y, width, height] on the device in Live.
// A cord is [source box, outlet, destination box, inlet].
"use strict";

module.exports = {
  name: "CMI",
  amxdType: "mmmm",
  scripts: ["cmi-live.js", "cmi-node.js"],
  boxes: [
    { id: "midiin", text: "midiin", at: [20, 20] },
    { id: "midiout", text: "midiout", at: [20, 60] },
    { id: "thisdevice", text: "live.thisdevice", at: [120, 20] },
    { id: "init", message: "init", at: [120, 60] },

    { id: "infill", ui: "live.text", label: "Infill", at: [240, 20], view: [8, 8, 56, 20] },
    { id: "infill-message", message: "infill", at: [240, 60] },
    { id: "again", ui: "live.text", label: "Again", at: [320, 20], view: [70, 8, 56, 20] },
    { id: "again-message", message: "again", at: [320, 60] },
    { id: "keep", ui: "live.text", label: "Keep", at: [400, 20], view: [132, 8, 56, 20] },
    { id: "keep-message", message: "keep", at: [400, 60] },
    { id: "candidates", ui: "umenu", label: "Candidate", at: [480, 20], view: [8, 36, 180, 20] },
    { id: "to-candidate", text: "prepend candidate", at: [480, 60] },
    { id: "temperature", ui: "live.dial", label: "Temperature", at: [640, 20], view: [200, 4, 44, 48],
      range: [0, 2], initial: 1 },
    { id: "to-temperature", text: "prepend temperature", at: [640, 100] },

    { id: "live", text: "js cmi-live.js", at: [240, 160], outlets: 3 },
    { id: "node", text: "node.script cmi-node.js @autostart 1 @watch 0", at: [240, 240] },
    { id: "status", ui: "comment", label: "not connected", at: [240, 300], view: [8, 64, 236, 36] },
  ],
  cords: [
    ["midiin", 0, "midiout", 0],
    ["thisdevice", 0, "init", 0],
    ["init", 0, "live", 0],
    ["infill", 0, "infill-message", 0],
    ["infill-message", 0, "live", 0],
    ["again", 0, "again-message", 0],
    ["again-message", 0, "live", 0],
    ["keep", 0, "keep-message", 0],
    ["keep-message", 0, "live", 0],
    ["candidates", 0, "to-candidate", 0],
    ["to-candidate", 0, "live", 0],
    ["temperature", 0, "to-temperature", 0],
    ["to-temperature", 0, "live", 0],
    ["live", 0, "node", 0],
    ["node", 0, "live", 0],
    ["live", 1, "status", 0],
    ["live", 2, "candidates", 0],
  ],
};
