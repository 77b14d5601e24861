// Node client of the CMI daemon (docs/protocol.md, version 1.0) for the Max for Live device's node.script:
// finds the daemon through its connection file, signs requests with HMAC-SHA256, matches replies by id.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

const PROTOCOL_VERSION = "1.0";
const DEFAULT_TIMEOUT_MS = 10000;
const INFILL_TIMEOUT_MARGIN_MS = 5000;
const START_HINT = "start it with `cmi-daemon start` (or `cmi-daemon start --detach` to run it in the background)";

class DaemonNotRunning extends Error {
  constructor(message) {
    super(message);
    this.name = "DaemonNotRunning";
  }
}

class DaemonTimeout extends Error {
  constructor(message) {
    super(message);
    this.name = "DaemonTimeout";
  }
}

// An error reply: `code` is one of the protocol's stable codes, `field` the offending field's path or null.
class DaemonError extends Error {
  constructor(code, message, field) {
    super(`daemon error ${code}${field ? ` [${field}]` : ""}: ${message}`);
    this.name = "DaemonError";
    this.code = code;
    this.field = field || null;
  }
}

// Where the running daemon's connection file is (docs/protocol.md section 1).
function defaultConnectionFile(env = process.env, platform = process.platform, home = os.homedir()) {
  if (env.CMI_HOME) return path.join(env.CMI_HOME, "state", "connection.json");
  if (platform === "darwin") return path.join(home, "Library", "Application Support", "cmi", "connection.json");
  if (platform === "win32") {
    const local = env.LOCALAPPDATA || path.join(home, "AppData", "Local");
    return path.join(local, "cmi", "cmi", "connection.json");
  }
  const state = env.XDG_STATE_HOME || path.join(home, ".local", "state");
  return path.join(state, "cmi", "connection.json");
}

function pidAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return error.code === "EPERM";
  }
}

// The connection info of the running daemon, or DaemonNotRunning saying how to start one.
function loadConnection(connectionFile = defaultConnectionFile()) {
  let info;
  try {
    info = JSON.parse(fs.readFileSync(connectionFile, "utf8"));
  } catch (error) {
    if (error.code === "ENOENT") {
      throw new DaemonNotRunning(`the CMI daemon is not running (no connection file at ${connectionFile}); ${START_HINT}`);
    }
    throw new Error(`${connectionFile}: unreadable connection file (${error.message})`);
  }
  for (const key of ["pid", "request_endpoint", "event_endpoint", "key", "protocol"]) {
    if (!(key in info)) throw new Error(`${connectionFile}: connection file lacks ${key}`);
  }
  if (!pidAlive(info.pid)) {
    throw new DaemonNotRunning(
      `the CMI daemon is not running (its process ${info.pid} has ended; ${connectionFile} is left over from it); ${START_HINT}`);
  }
  return info;
}

// Lowercase hex HMAC-SHA256 of the body, keyed by the ASCII text of the connection file's key.
function sign(key, body) {
  return Buffer.from(crypto.createHmac("sha256", key).update(body).digest("hex"), "ascii");
}

function signatureMatches(key, body, signature) {
  const expected = sign(key, body);
  return signature.length === expected.length && crypto.timingSafeEqual(signature, expected);
}

function applyCurve(socket, serverKey) {
  if (!serverKey) return;
  const pair = zmq.curveKeyPair();
  socket.curveServerKey = serverKey;
  socket.curvePublicKey = pair.publicKey;
  socket.curveSecretKey = pair.secretKey;
}

// Signed requests over one DEALER socket; several may be in flight, each reply finds its request by id.
class CmiClient {
  constructor({ connection, connectionFile, timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
    this.connection = connection || loadConnection(connectionFile || defaultConnectionFile());
    this.key = this.connection.key;
    this.timeoutMs = timeoutMs;
    this.pending = new Map();
    this.nextId = 1;
    this.prefix = crypto.randomBytes(4).toString("hex");
    this.socket = new zmq.Dealer({ linger: 0 });
    applyCurve(this.socket, this.connection.curve_server_key);
    this.socket.connect(this.connection.request_endpoint);
    this.receiving = this.receiveLoop();
  }

  async receiveLoop() {
    try {
      for await (const frames of this.socket) {
        this.dispatch(frames);
      }
    } catch (error) {
      if (!this.socket.closed) this.failAll(error);
    }
  }

  dispatch(frames) {
    if (frames.length !== 2 || !signatureMatches(this.key, frames[1], frames[0])) return;
    let reply;
    try {
      reply = decode(frames[1]);
    } catch (error) {
      return;
    }
    const waiting = reply && this.pending.get(reply.id);
    if (!waiting) return;
    this.pending.delete(reply.id);
    clearTimeout(waiting.timer);
    if (reply.ok === true) {
      waiting.resolve(reply.content || {});
    } else {
      const error = reply.error || {};
      waiting.reject(new DaemonError(String(error.code || "internal"), String(error.message || ""), error.field));
    }
  }

  failAll(error) {
    for (const [id, waiting] of this.pending) {
      clearTimeout(waiting.timer);
      waiting.reject(error);
      this.pending.delete(id);
    }
  }

  expired(id, timeoutMs) {
    const waiting = this.pending.get(id);
    if (!waiting) return;
    this.pending.delete(id);
    if (!pidAlive(this.connection.pid)) {
      waiting.reject(new DaemonNotRunning(
        `the CMI daemon is not running: its process ${this.connection.pid} ended before it replied; ${START_HINT}`));
    } else {
      waiting.reject(new DaemonTimeout(
        `no reply from the CMI daemon within ${timeoutMs} ms (request ${id}); \`cmi-daemon status\` shows what it is doing`));
    }
  }

  newId() {
    return `${this.prefix}-${this.nextId++}`;
  }

  // Send a request and wait for its reply's content; rejects with DaemonError, DaemonTimeout or DaemonNotRunning.
  request(type, content = {}, { timeoutMs = this.timeoutMs, id = this.newId() } = {}) {
    const body = Buffer.from(encode({ protocol: PROTOCOL_VERSION, id, type, content }));
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.expired(id, timeoutMs), timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
    });
    this.socket.send([sign(this.key, body), body]).catch((error) => {
      const waiting = this.pending.get(id);
      if (waiting) {
        this.pending.delete(id);
        clearTimeout(waiting.timer);
        waiting.reject(error);
      }
    });
    return reply;
  }

  hello() {
    return this.request("hello", { client: "cmi-ableton" });
  }

  status() {
    return this.request("status");
  }

  shutdown() {
    return this.request("shutdown");
  }

  profiles(reset) {
    return this.request("profiles", reset ? { action: "reset", name: reset } : { action: "list" });
  }

  feedback(session, verdict, candidate = 0) {
    return this.request("feedback", { session, verdict, candidate });
  }

  cancel(requestId) {
    return this.request("cancel", { request: requestId });
  }

  // An infill waits as long as the daemon may take, plus a margin: its timeout_ms, or without one the
  // daemon's default (request_timeout_ms, asked with hello).
  async infill(content, { id } = {}) {
    const limitMs = content.timeout_ms || (await this.hello()).limits.request_timeout_ms;
    return this.request("infill", content, { timeoutMs: limitMs + INFILL_TIMEOUT_MARGIN_MS, id: id || this.newId() });
  }

  close() {
    this.socket.close();
    this.failAll(new Error("client closed"));
  }
}

// Events (progress.<id>, status, dil.<profile>): onEvent(topic, envelope) for each correctly signed one.
class CmiEvents {
  constructor(connection, topics, onEvent) {
    this.socket = new zmq.Subscriber({ linger: 0 });
    applyCurve(this.socket, connection.curve_server_key);
    for (const topic of topics) this.socket.subscribe(topic);
    this.socket.connect(connection.event_endpoint);
    this.done = this.loop(connection.key, onEvent);
  }

  async loop(key, onEvent) {
    try {
      for await (const frames of this.socket) {
        if (frames.length === 3 && signatureMatches(key, frames[2], frames[1])) {
          onEvent(frames[0].toString("utf8"), decode(frames[2]));
        }
      }
    } catch (error) {
      if (!this.socket.closed) throw error;
    }
  }

  close() {
    this.socket.close();
  }
}

module.exports = {
  PROTOCOL_VERSION,
  CmiClient,
  CmiEvents,
  DaemonError,
  DaemonNotRunning,
  DaemonTimeout,
  defaultConnectionFile,
  loadConnection,
  sign,
};
