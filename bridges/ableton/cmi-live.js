// The [js] part of the CMI Max for Live device: reads the shown MIDI clip through the Live API (LiveAPI),
// builds the daemon's infill request, sends it to the [node.script] part through the patcher and writes
// the answer back into the clip. Written for Max's classic js object (ES5), so it runs in Max 8 and 9.
//
// Messages in (from the device's UI and the node part): init, infill, again, keep, candidate N,
// temperature T, ready, response ID INDEX COUNT CHUNK.
// Outlets: 0 to node.script (request ID INDEX COUNT CHUNK), 1 to the status comment (set TEXT),
// 2 to the candidate menu (clear, append ITEM, set N).

autowatch = 0;
inlets = 1;
outlets = 3;

var NODE_OUTLET = 0;
var STATUS_OUTLET = 1;
var MENU_OUTLET = 2;
// Max messages are assumed to be capped at 32,767 characters: long texts travel in chunks well below that.
var CHUNK_CHARS = 30000;
// Every chunk starts with this mark so that Max never reads a chunk as a number.
var CHUNK_MARK = "|";
var CANDIDATES = 3;
var INFILL_TIMEOUT_MS = 120000;
var REPLY_MARGIN_MS = 10000;
var SHORT_REPLY_TIMEOUT_MS = 15000;
var ALL_PITCHES = 128;
var MIN_VELOCITY = 1;
var MAX_VELOCITY = 127;

var device = null;
var temperatureValue = 1.0;
var pending = {};
var nextRequest = 1;
var last = null;
var link = { connected: false, model: "", latencyMs: null, problem: "starting" };

// ---- Live API helpers -------------------------------------------------------------------------

function exists(api) {
	var id = String(api.id);
	return id !== "0" && id !== "id 0";
}

function value(api, property) {
	return api.get(property)[0];
}

function text(api, property) {
	return [].concat(api.get(property)).join(" ");
}

// The object an "id N" pair of a flat id list points at (Live answers object properties as ["id", N]).
function objectAt(idList) {
	return new LiveAPI("id " + idList[1]);
}

// The track holding a device or a clip: up through canonical_parent (a clip slot, a rack chain ...).
function trackOf(api) {
	var parent = objectAt(api.get("canonical_parent"));
	while (exists(parent) && parent.type !== "Track") {
		parent = objectAt(parent.get("canonical_parent"));
	}
	return parent;
}

// ---- Status line and candidate menu -----------------------------------------------------------

function showStatus(message) {
	var line = link.connected
		? "connected, model " + link.model + (link.latencyMs === null ? "" : ", last " + link.latencyMs + " ms")
		: "not connected: " + link.problem;
	outlet(STATUS_OUTLET, "set", message ? line + " | " + message : line);
}

function showCandidates(candidates) {
	outlet(MENU_OUTLET, "clear");
	for (var i = 0; i < candidates.length; i++) {
		outlet(MENU_OUTLET, "append", "Candidate " + (i + 1) + " (" + candidates[i].tracks[0].notes.length + " notes)");
	}
	outlet(MENU_OUTLET, "set", 0);
}

// ---- Requests to the node part, matched by id with a timeout ----------------------------------

function sendRequest(type, content, timeoutMs, onReply) {
	var id = "r" + nextRequest++;
	var message = JSON.stringify({ type: type, content: content });
	var count = Math.max(1, Math.ceil(message.length / CHUNK_CHARS));
	var timer = new Task(function () { expire(id); }, this);
	pending[id] = { onReply: onReply, timer: timer, chunks: [], received: 0 };
	timer.schedule(timeoutMs);
	for (var index = 0; index < count; index++) {
		outlet(NODE_OUTLET, "request", id, index, count, CHUNK_MARK + message.substr(index * CHUNK_CHARS, CHUNK_CHARS));
	}
}

function expire(id) {
	if (!pending[id]) return;
	delete pending[id];
	link.connected = false;
	link.problem = "no answer from the device's node.script (is Node for Max running?)";
	showStatus();
}

function response(id, index, count, chunk) {
	var waiting = pending[id];
	if (!waiting) return;
	if (waiting.chunks[index] === undefined) waiting.received++;
	waiting.chunks[index] = String(chunk).substr(CHUNK_MARK.length);
	if (waiting.received < count) return;
	delete pending[id];
	waiting.timer.cancel();
	var reply = JSON.parse(waiting.chunks.join(""));
	if (reply.ok) {
		link.connected = true;
		link.latencyMs = reply.latency_ms;
		waiting.onReply(reply.content);
	} else {
		noteFailure(reply.error);
	}
}

// The status line gets a short text; the Max console gets the whole message.
var LINK_PROBLEMS = {
	not_running: "the CMI daemon is not running: start it with cmi-daemon start",
	timeout: "the CMI daemon did not answer in time",
};

function noteFailure(error) {
	post("CMI: " + error.code + ": " + error.message + "\n");
	if (LINK_PROBLEMS[error.code]) {
		link.connected = false;
		link.problem = LINK_PROBLEMS[error.code];
		showStatus();
	} else {
		showStatus("daemon error " + error.code + ": " + error.message);
	}
}

// ---- Reading the clip -------------------------------------------------------------------------

function songMeter() {
	var song = new LiveAPI("live_set");
	var numerator = value(song, "signature_numerator");
	var denominator = value(song, "signature_denominator");
	return { tempoBpm: value(song, "tempo"), numerator: numerator, denominator: denominator,
		barBeats: numerator * 4 / denominator };
}

// Song beats minus clip beats. Session clips start at song beat 0. An arrangement clip plays its
// start_marker at start_time; if that would put clip beat 0 before the song's start, whole bars are
// added instead (with one tempo and one meter, only the position within the bar matters).
function clipOffsetBeats(clip, barBeats) {
	if (value(clip, "is_arrangement_clip") !== 1) return 0;
	var offsetBeats = value(clip, "start_time") - value(clip, "start_marker");
	return offsetBeats >= 0 ? offsetBeats : offsetBeats + Math.ceil(-offsetBeats / barBeats) * barBeats;
}

function clipEndBeats(clip) {
	return Math.max(value(clip, "length"), value(clip, "end_marker"), value(clip, "loop_end"));
}

// Live's API exposes no time selection inside a clip: the range is the bars spanned by the selected
// notes, or the clip's loop when no note is selected. Returned in clip beats.
function rangeBeats(clip, offsetBeats, barBeats) {
	var selected = JSON.parse(clip.call("get_selected_notes_extended")).notes;
	if (selected.length === 0) {
		return { startBeats: value(clip, "loop_start"), endBeats: value(clip, "loop_end") };
	}
	var firstBeats = Infinity;
	var lastBeats = -Infinity;
	selected.forEach(function (note) {
		firstBeats = Math.min(firstBeats, note.start_time);
		lastBeats = Math.max(lastBeats, note.start_time + note.duration);
	});
	return {
		startBeats: Math.floor((firstBeats + offsetBeats) / barBeats) * barBeats - offsetBeats,
		endBeats: Math.ceil((lastBeats + offsetBeats) / barBeats) * barBeats - offsetBeats,
	};
}

// The clip's unmuted notes as the protocol's [start_qn, duration_qn, pitch, velocity], in song beats.
function protocolNotes(clip, offsetBeats) {
	var notes = JSON.parse(clip.call("get_notes_extended", 0, ALL_PITCHES, 0, clipEndBeats(clip))).notes;
	var result = [];
	notes.forEach(function (note) {
		var startQn = note.start_time + offsetBeats;
		if (note.mute === 1 || startQn < 0 || note.duration <= 0) return;
		var velocity = Math.min(MAX_VELOCITY, Math.max(MIN_VELOCITY, Math.round(note.velocity)));
		result.push([startQn, note.duration, note.pitch, velocity]);
	});
	result.sort(function (a, b) { return a[0] - b[0] || a[2] - b[2]; });
	return result;
}

// The MIDI clip shown in Live's detail view, if it is on this device's track; otherwise null and a status.
function shownClip() {
	var clip = new LiveAPI("live_set view detail_clip");
	if (!exists(clip) || value(clip, "is_midi_clip") !== 1) {
		showStatus("show a MIDI clip of this track first (double-click it)");
		return null;
	}
	if (String(trackOf(clip).id) !== device.trackId) {
		showStatus("the clip shown is on another track: show one of this track");
		return null;
	}
	return clip;
}

function infillRequest(clip) {
	var meter = songMeter();
	var offsetBeats = clipOffsetBeats(clip, meter.barBeats);
	var range = rangeBeats(clip, offsetBeats, meter.barBeats);
	var clipId = String(clip.id);
	return {
		clipId: clipId,
		offsetBeats: offsetBeats,
		startBeats: range.startBeats,
		endBeats: range.endBeats,
		content: {
			session: "live:" + device.id + ":" + clipId + ":" + range.startBeats + "-" + range.endBeats,
			tracks: [{ name: text(trackOf(clip), "name"), program: 0, drum: false, notes: protocolNotes(clip, offsetBeats) }],
			tempo: [[0, meter.tempoBpm]],
			time_signatures: [[0, meter.numerator, meter.denominator]],
			range: [range.startBeats + offsetBeats, range.endBeats + offsetBeats],
			targets: [0],
			options: { candidates: CANDIDATES, temperature: temperatureValue },
			timeout_ms: INFILL_TIMEOUT_MS,
		},
	};
}

// ---- Writing an answer ------------------------------------------------------------------------

// Replaces the notes that start inside the range by the candidate's, in one burst of two calls.
function writeCandidate(index) {
	var clip = new LiveAPI("id " + last.clipId);
	if (!exists(clip)) {
		showStatus("the clip was deleted");
		return;
	}
	var notes = last.candidates[index].tracks[0].notes.map(function (note) {
		return { pitch: note[2], start_time: note[0] - last.offsetBeats, duration: note[1], velocity: note[3], mute: 0 };
	});
	clip.call("remove_notes_extended", 0, ALL_PITCHES, last.startBeats, last.endBeats - last.startBeats);
	if (notes.length > 0) clip.call("add_new_notes", JSON.stringify({ notes: notes }));
	last.chosen = index;
}

function sendInfill(request) {
	showStatus("infilling beats " + request.startBeats + "-" + request.endBeats + " ...");
	sendRequest("infill", request.content, INFILL_TIMEOUT_MS + REPLY_MARGIN_MS, function (reply) {
		link.model = reply.model;
		last = request;
		last.candidates = reply.candidates;
		writeCandidate(0);
		showCandidates(reply.candidates);
		showStatus("candidate 1 of " + reply.candidates.length);
	});
}

// ---- Messages from the patcher ----------------------------------------------------------------

function sayHello() {
	sendRequest("hello", {}, SHORT_REPLY_TIMEOUT_MS, function (reply) {
		link.model = reply.model.name;
		showStatus();
	});
}

// Sent by live.thisdevice once the device is loaded: only then may LiveAPI objects be made.
function init() {
	var thisDevice = new LiveAPI("this_device");
	device = { id: String(thisDevice.id), trackId: String(trackOf(thisDevice).id) };
	sayHello();
}

// Sent by the node part once Node runs: a hello sent before then was lost.
function ready() {
	if (device) sayHello();
}

function infill() {
	if (!device) return;
	var clip = shownClip();
	if (clip) sendInfill(infillRequest(clip));
}

// The same range with the same session: the daemon takes the repeat as "not this".
function again() {
	if (!last) {
		showStatus("press Infill first");
		return;
	}
	var request = { clipId: last.clipId, offsetBeats: last.offsetBeats, startBeats: last.startBeats,
		endBeats: last.endBeats, content: JSON.parse(JSON.stringify(last.content)) };
	request.content.options.temperature = temperatureValue;
	sendInfill(request);
}

function keep() {
	if (!last) {
		showStatus("press Infill first");
		return;
	}
	var chosen = last.chosen;
	sendRequest("feedback", { session: last.content.session, verdict: "accept", candidate: chosen },
		SHORT_REPLY_TIMEOUT_MS, function () { showStatus("kept candidate " + (chosen + 1)); });
}

function candidate(index) {
	if (!last || index < 0 || index >= last.candidates.length || index === last.chosen) return;
	writeCandidate(index);
	showStatus("candidate " + (index + 1) + " of " + last.candidates.length);
}

// Called by Max when the device is removed.
function notifydeleted() {
	outlet(NODE_OUTLET, "close");
}

function temperature(newTemperature) {
	temperatureValue = Math.max(0, Math.min(5, newTemperature));
}
