// A live CMI daemon for the Node tests: `python -m cmi_daemon.cli.main start` with a temporary CMI_HOME and the
// default model shipped in the package (the real engine). Python is $CMI_PYTHON, else `python`.
"use strict";

const { spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const REPO = path.resolve(__dirname, "..", "..", "..");
const PYTHON = process.env.CMI_PYTHON || "python";
const START_TIMEOUT_MS = 60000;

function pythonEnv(home) {
  const env = { ...process.env, CMI_HOME: home, PYTHONPATH: REPO };
  delete env.XDG_STATE_HOME;
  return env;
}

const DEFAULT_MODEL_DIR = path.join(REPO, "cmi_daemon", "models", "default");

// Starts a daemon on the shipped default model under CMI_HOME=home; resolves once its connection file
// names its process.
async function startDaemon(home) {
  const daemon = spawn(PYTHON, ["-m", "cmi_daemon.cli.main", "start", "--model", DEFAULT_MODEL_DIR, "--port", "0"],
    { cwd: REPO, env: pythonEnv(home), stdio: ["ignore", "ignore", "pipe"] });
  let output = "";
  daemon.stderr.on("data", (chunk) => { output += chunk; });
  const connectionFile = path.join(home, "state", "connection.json");
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (daemon.exitCode !== null) throw new Error(`the daemon exited: ${output}`);
    if (fs.existsSync(connectionFile) && JSON.parse(fs.readFileSync(connectionFile, "utf8")).pid === daemon.pid) {
      return { daemon, connectionFile };
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  daemon.kill("SIGKILL");
  throw new Error(`the daemon did not start: ${output}`);
}

module.exports = { startDaemon };
