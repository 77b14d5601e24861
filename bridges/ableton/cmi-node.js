// The [node.script] part of the CMI Max for Live device: takes requests from the device's [js] part
// (cmi-live.js) through the patcher, asks the CMI daemon with cmi-client.js and answers by request id.
// Texts travel in chunks below Max's (assumed) 32,767-character message cap, each behind a "|" mark.
"use strict";

const maxApi = require("max-api");
const { CmiClient, DaemonError, DaemonNotRunning, DaemonTimeout, loadConnection } = require("./cmi-client.js");

const CHUNK_CHARS = 30000;
const CHUNK_MARK = "|";
const SHORT_TIMEOUT_MS = 10000;

const incoming = new Map();
let client = null;

// A client of the daemon that runs now: the connection file is read again for every request, so a
// daemon started (or restarted) after Live is found without reloading the device.
function currentClient() {
  const connection = loadConnection();
  const same = client && client.connection.pid === connection.pid && client.connection.key === connection.key
    && client.connection.request_endpoint === connection.request_endpoint;
  if (same) return client;
  if (client) client.close();
  client = new CmiClient({ connection, timeoutMs: SHORT_TIMEOUT_MS });
  return client;
}

const REQUESTS = {
  hello: (daemon) => daemon.hello(),
  infill: (daemon, content) => daemon.infill(content),
  feedback: (daemon, content) => daemon.feedback(content.session, content.verdict, content.candidate),
};

function failure(error) {
  if (error instanceof DaemonNotRunning) return { code: "not_running", message: error.message };
  if (error instanceof DaemonTimeout) return { code: "timeout", message: error.message };
  if (error instanceof DaemonError) return { code: error.code, message: error.message };
  return { code: "bridge", message: error.message };
}

async function perform(type, content) {
  const startedMs = performance.now();
  try {
    if (!REQUESTS[type]) throw new Error(`unknown request type ${type}`);
    const reply = await REQUESTS[type](currentClient(), content);
    return { ok: true, content: reply, latency_ms: Math.round(performance.now() - startedMs) };
  } catch (error) {
    return { ok: false, error: failure(error) };
  }
}

async function answer(id, reply) {
  const message = JSON.stringify(reply);
  const count = Math.max(1, Math.ceil(message.length / CHUNK_CHARS));
  for (let index = 0; index < count; index++) {
    await maxApi.outlet("response", id, index, count, CHUNK_MARK + message.slice(index * CHUNK_CHARS, (index + 1) * CHUNK_CHARS));
  }
}

// One chunk of a request; once all have come, the request runs and its reply goes back by id.
async function onRequestChunk(id, index, count, chunk) {
  const parts = incoming.get(id) || { chunks: new Array(count), received: 0 };
  if (parts.chunks[index] === undefined) parts.received++;
  parts.chunks[index] = String(chunk).slice(CHUNK_MARK.length);
  incoming.set(id, parts);
  if (parts.received < count) return;
  incoming.delete(id);
  let request;
  try {
    request = JSON.parse(parts.chunks.join(""));
  } catch (error) {
    await answer(id, { ok: false, error: { code: "bridge", message: `unreadable request: ${error.message}` } });
    return;
  }
  await answer(id, await perform(request.type, request.content));
}

// Sent by the js part when the device is removed: lets go of the daemon connection.
function onClose() {
  if (client) client.close();
  client = null;
}

maxApi.addHandler("request", onRequestChunk);
maxApi.addHandler("close", onClose);
// Messages sent before Node has started are lost: the js part says hello again on this.
maxApi.outlet("ready");
