// A fake Max for the device's tests: runs the device's patcher as device-layout.js describes it, with
// cmi-live.js in a stand-in for Max's classic [js] object (its globals: outlet, post, Task, LiveAPI,
// messagename) and cmi-node.js loaded with a mock of Node for Max's "max-api" module (addHandler,
// Promise-returning outlet, outletBang, post, getDict/setDict/updateDict). Messages travel along the
// layout's patch cords; each must stay under Max's assumed 32,767-character cap.
"use strict";

const fs = require("node:fs");
const Module = require("node:module");
const path = require("node:path");
const vm = require("node:vm");
const layout = require("../device-layout.js");

const DEVICE_DIR = path.resolve(__dirname, "..");
const MAX_MESSAGE_CHARS = 32767;
const MAX_API_PATH = path.join(DEVICE_DIR, "test-support", "max-api (fake)");

function checkSize(atoms) {
  const chars = atoms.map(String).join(" ").length;
  if (chars > MAX_MESSAGE_CHARS) throw new Error(`a ${chars}-character Max message: over the 32,767 cap`);
}

// Max's scheduler runs later; setImmediate keeps the order messages were sent in.
function later(action) {
  return new Promise((resolve, reject) => setImmediate(() => {
    try {
      resolve(action());
    } catch (error) {
      reject(error);
    }
  }));
}

function createMaxApi(sendOut) {
  const handlers = new Map();
  const dicts = new Map();
  return {
    posts: [],
    MESSAGE_TYPES: { ALL: "all", BANG: "bang", DICT: "dict", LIST: "list", NUMBER: "number" },
    POST_LEVELS: { ERROR: "error", INFO: "info", WARN: "warn" },
    MAX_ENV: { MAX: "max", MAX_FOR_LIVE: "maxforlive", STANDALONE: "standalone" },
    addHandler(selector, handler) {
      handlers.set(selector, handler);
    },
    addHandlers(map) {
      for (const [selector, handler] of Object.entries(map)) handlers.set(selector, handler);
    },
    removeHandler(selector) {
      handlers.delete(selector);
    },
    outlet(...atoms) {
      checkSize(atoms);
      return later(() => sendOut(atoms));
    },
    outletBang() {
      return this.outlet("bang");
    },
    post(...items) {
      this.posts.push(items.join(" "));
      return Promise.resolve();
    },
    getDict(name) {
      return dicts.has(name) ? Promise.resolve(dicts.get(name)) : Promise.reject(new Error(`no dict ${name}`));
    },
    setDict(name, content) {
      dicts.set(name, content);
      return Promise.resolve(content);
    },
    updateDict(name, key, value) {
      const content = { ...(dicts.get(name) || {}), [key]: value };
      dicts.set(name, content);
      return Promise.resolve(content);
    },
    // Max delivering an inlet message to the script: the handler named by the selector runs.
    deliver(selector, args) {
      const handler = handlers.get(selector);
      if (!handler) throw new Error(`node.script: no handler for ${selector}`);
      return handler(...args);
    },
  };
}

// cmi-node.js loaded afresh, its require("max-api") answered by `maxApi`.
function loadNodeScript(maxApi) {
  const resolve = Module._resolveFilename;
  Module._resolveFilename = function resolveMaxApi(request, ...rest) {
    return request === "max-api" ? MAX_API_PATH : resolve.call(this, request, ...rest);
  };
  const fake = new Module(MAX_API_PATH);
  fake.exports = maxApi;
  fake.loaded = true;
  require.cache[MAX_API_PATH] = fake;
  const script = path.join(DEVICE_DIR, "cmi-node.js");
  delete require.cache[script];
  try {
    require(script);
  } finally {
    Module._resolveFilename = resolve;
    delete require.cache[script];
  }
}

// Max's Task; delays are multiplied by timeScale so tests need not wait for real timeouts.
function taskClass(timeScale) {
  return class FakeTask {
    constructor(callback, owner) {
      this.callback = callback.bind(owner);
      this.timer = null;
    }

    schedule(delayMs) {
      this.cancel();
      this.timer = setTimeout(this.callback, (delayMs || 0) * timeScale);
    }

    cancel() {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
    }
  };
}

// cmi-live.js in a context with the globals of Max's [js] object.
function loadJsScript(LiveAPI, sendOut, posts, timeScale) {
  const context = vm.createContext({
    LiveAPI,
    Task: taskClass(timeScale),
    post: (...items) => posts.push(items.join(" ")),
    outlet: (index, ...atoms) => {
      checkSize(atoms);
      sendOut(index, atoms);
    },
  });
  const file = path.join(DEVICE_DIR, "cmi-live.js");
  vm.runInContext(fs.readFileSync(file, "utf8"), context, { filename: file });
  return {
    context,
    message(atoms) {
      const [selector, ...args] = atoms;
      const method = context[selector];
      if (typeof method !== "function") throw new Error(`js: doesn't understand "${selector}"`);
      context.messagename = selector;
      method(...args);
    },
  };
}

// One device on a track: the layout's objects with their Max behaviour, wired by its patch cords.
// With nodeRunning false, node.script drops what it gets, as when its Node process is not running.
class FakeDevice {
  constructor(LiveAPI, { nodeRunning = true, taskTimeScale = 1 } = {}) {
    this.nodeRunning = nodeRunning;
    this.posts = [];
    this.statusText = "";
    this.menuItems = [];
    this.menuIndex = null;
    this.traffic = [];
    this.boxes = new Map(layout.boxes.map((box) => [box.id, box]));
    this.maxApi = createMaxApi((atoms) => this.send("node", 0, atoms));
    if (nodeRunning) loadNodeScript(this.maxApi);
    this.js = loadJsScript(LiveAPI, (index, atoms) => this.send("live", index, atoms), this.posts, taskTimeScale);
  }

  send(fromId, outletIndex, atoms) {
    this.traffic.push({ from: fromId, outlet: outletIndex, atoms });
    for (const [source, sourceOutlet, destination, inlet] of layout.cords) {
      if (source === fromId && sourceOutlet === outletIndex) this.receive(destination, inlet, atoms);
    }
  }

  receive(id, inlet, atoms) {
    const box = this.boxes.get(id);
    const kind = box.message !== undefined ? "message" : box.ui || box.text.split(" ")[0];
    const behaviour = {
      message: () => this.send(id, 0, box.message.split(" ")),
      prepend: () => this.send(id, 0, [...box.text.split(" ").slice(1), ...atoms]),
      js: () => this.js.message(atoms),
      "node.script": () => {
        if (this.nodeRunning) this.maxApi.deliver(atoms[0], atoms.slice(1));
      },
      comment: () => {
        if (atoms[0] === "set") this.statusText = atoms.slice(1).join(" ");
      },
      umenu: () => this.menuMessage(atoms),
      midiout: () => {},
    }[kind];
    if (!behaviour) throw new Error(`fake Max: no behaviour for ${kind} (box ${id})`);
    behaviour();
  }

  menuMessage([selector, ...args]) {
    if (selector === "clear") this.menuItems = [];
    else if (selector === "append") this.menuItems.push(args.join(" "));
    else if (selector === "set") this.menuIndex = args[0];
    else throw new Error(`umenu: unexpected ${selector}`);
  }

  // The requests the js part sent (selector "request") or the replies the node part sent ("response"),
  // each reassembled from its chunks, in the order they were completed.
  messages(selector) {
    const chunks = new Map();
    const complete = [];
    for (const { atoms } of this.traffic) {
      if (atoms[0] !== selector) continue;
      const [, id, index, count, chunk] = atoms;
      const parts = chunks.get(id) || [];
      parts[index] = chunk.slice(1);
      chunks.set(id, parts);
      if (parts.filter((part) => part !== undefined).length === count) {
        complete.push({ id, chunkCount: count, body: JSON.parse(parts.join("")) });
      }
    }
    return complete;
  }

  // The user's gestures on the device's UI.
  load() {
    this.send("thisdevice", 0, ["bang"]);
  }

  press(buttonId) {
    if (this.boxes.get(buttonId).ui !== "live.text") throw new Error(`${buttonId} is not a button`);
    this.send(buttonId, 0, ["bang"]);
  }

  chooseCandidate(index) {
    this.menuIndex = index;
    this.send("candidates", 0, [index]);
  }

  turnTemperature(value) {
    this.send("temperature", 0, [value]);
  }

  // A dial (the controls' polyphony, density, length, low, high; repeats) turned, or the grid menu's item chosen.
  turn(controlId, value) {
    const ui = this.boxes.get(controlId).ui;
    if (ui !== "live.dial" && ui !== "live.menu") throw new Error(`${controlId} is not a dial or menu`);
    this.send(controlId, 0, [value]);
  }

  remove() {
    this.js.message(["notifydeleted"]);
  }
}

module.exports = { FakeDevice };
