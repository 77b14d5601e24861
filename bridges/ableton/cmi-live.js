// The [js] part of the CMI Max for Live device: reads the shown MIDI clip through the Live API (LiveAPI),
// builds the daemon's infill request within the limits its hello reports, sends it to the [node.script]
// part through the patcher and writes the answer back into the clip. Written for Max's classic js object
// (ES5), so it runs in Max 8 and 9.
//
// Writing never loses the musician's notes: add_new_notes is tried with a JSON string and with an object
// (which form each runtime accepts is not documented), the range is emptied only once Live has taken a
// new note in one of them, and the notes that were there are put back if it then takes none of the rest.
//
// Messages in (from the device's UI and the node part): init, infill, again, keep, candidate N,
// temperature T, repeats F (how closely to follow the song's repeats, 0..1), control NAME VALUE (the
// per-track controls' dials and grid menu), ready,
// response ID INDEX COUNT CHUNK.
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
var REPLY_MARGIN_MS = 10000;
var SHORT_REPLY_TIMEOUT_MS = 15000;
var ALL_PITCHES = 128;
var MIN_VELOCITY = 1;
var MAX_VELOCITY = 127;
var BEATS_EPSILON = 1e-6;
// What the device needs from the limits of the daemon's hello (docs/protocol.md section 8).
var NEEDED_LIMITS = ["max_notes", "max_range_qn", "max_candidates", "max_temperature", "max_track_name_chars",
	"context_bars", "request_timeout_ms"];
// The forms add_new_notes is given its {notes: [...]} in, the one that last worked first.
var NOTE_ARGUMENT_FORMS = [
	{ name: "a JSON string", make: function (notes) { return JSON.stringify({ notes: notes }); } },
	{ name: "an object", make: function (notes) { return { notes: notes }; } },
];

// The grid menu's items, in its order: what options.controls[].grid takes (docs/protocol.md 5.2).
var GRID_CHOICES = ["auto", "off", "1/4", "1/8", "1/8T", "1/16", "1/16T", "1/32"];
var INSTRUMENT_DEVICE_TYPE = 1;

var device = null;
var temperatureValue = 1.0;
var followRepeatValue = 1.0;
// The control dials as set: 0 (Low 0, High 127, Vel Lo 1, Vel Hi 127, grid auto) leaves a control to the
// clip's own notes.
var controlValues = { polyphony: 0, density: 0, length: 0, low: 0, high: ALL_PITCHES - 1, vello: MIN_VELOCITY,
	velhi: MAX_VELOCITY, grid: 0 };
var pending = {};
var nextRequest = 1;
var last = null;
var link = { connected: false, model: "", latencyMs: null, problem: "starting", limits: null };

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
// A track plays drums when its first instrument is a Drum Rack (daw-apis.md section B).
function isDrumRackTrack(track) {
	var ids = track.get("devices");
	for (var i = 0; i + 1 < ids.length; i += 2) {
		var instrument = new LiveAPI("id " + ids[i + 1]);
		if (exists(instrument) && value(instrument, "type") === INSTRUMENT_DEVICE_TYPE) {
			return value(instrument, "can_have_drum_pads") === 1;
		}
	}
	return false;
}

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

// The clip's unmuted notes sounding in [fromQn, toQn) as the protocol's [start_qn, duration_qn, pitch,
// velocity], in song beats.
function protocolNotes(clip, offsetBeats, fromQn, toQn) {
	var notes = JSON.parse(clip.call("get_notes_extended", 0, ALL_PITCHES, 0, clipEndBeats(clip))).notes;
	var result = [];
	notes.forEach(function (note) {
		var startQn = note.start_time + offsetBeats;
		// A zero-length note is sent: the daemon's degenerate-note rule keeps it (docs/protocol.md).
		if (note.mute === 1 || startQn < 0 || note.duration < 0) return;
		if (startQn >= toQn || startQn + note.duration <= fromQn) return;
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

// The request for the clip's range with context_bars of context each side, or null (and a status saying
// what to change) when it would exceed the daemon's limits.
function infillRequest(clip, limits) {
	var meter = songMeter();
	var offsetBeats = clipOffsetBeats(clip, meter.barBeats);
	var range = rangeBeats(clip, offsetBeats, meter.barBeats);
	var lengthBeats = range.endBeats - range.startBeats;
	if (lengthBeats > limits.max_range_qn) {
		showStatus("the range is " + lengthBeats + " beats; CMI infills at most " + limits.max_range_qn
			+ " at once: shorten the loop or select fewer bars");
		return null;
	}
	var startQn = range.startBeats + offsetBeats;
	var endQn = range.endBeats + offsetBeats;
	var contextBeats = limits.context_bars * meter.barBeats;
	var notes = protocolNotes(clip, offsetBeats, startQn - contextBeats, endQn + contextBeats);
	if (notes.length > limits.max_notes) {
		showStatus("the clip holds " + notes.length + " notes in and around the range; CMI takes at most "
			+ limits.max_notes + " at once");
		return null;
	}
	var clipId = String(clip.id);
	return {
		clipId: clipId,
		limits: limits,
		offsetBeats: offsetBeats,
		startBeats: range.startBeats,
		endBeats: range.endBeats,
		content: {
			session: "live:" + device.id + ":" + clipId + ":" + range.startBeats + "-" + range.endBeats,
			tracks: [{ name: text(trackOf(clip), "name").substr(0, limits.max_track_name_chars), program: 0,
				drum: isDrumRackTrack(trackOf(clip)), notes: notes }],
			tempo: [[0, meter.tempoBpm]],
			time_signatures: [[0, meter.numerator, meter.denominator]],
			range: [startQn, endQn],
			targets: [0],
			options: infillOptions(limits),
			timeout_ms: limits.request_timeout_ms,
		},
	};
}

// The options of an infill: candidates, temperature, how closely to follow the song's repeats and the
// controls the dials set.
function infillOptions(limits) {
	var options = { candidates: Math.min(CANDIDATES, limits.max_candidates),
		temperature: Math.min(temperatureValue, limits.max_temperature), follow_repeat: followRepeatValue };
	var controls = { track: 0 };
	if (controlValues.polyphony >= 1) controls.max_polyphony = Math.round(controlValues.polyphony);
	if (controlValues.density > 0) controls.density_per_qn = controlValues.density;
	if (controlValues.length > 0) controls.note_length_qn = controlValues.length;
	var low = Math.round(Math.min(controlValues.low, controlValues.high));
	var high = Math.round(Math.max(controlValues.low, controlValues.high));
	if (low > 0 || high < ALL_PITCHES - 1) controls.pitch_range = [low, high];
	var softest = Math.round(Math.max(MIN_VELOCITY, Math.min(controlValues.vello, controlValues.velhi)));
	var loudest = Math.round(Math.min(MAX_VELOCITY, Math.max(controlValues.vello, controlValues.velhi)));
	if (softest > MIN_VELOCITY || loudest < MAX_VELOCITY) controls.velocity_range = [softest, loudest];
	if (controlValues.grid > 0) controls.grid = GRID_CHOICES[controlValues.grid];
	if (Object.keys(controls).length > 1) options.controls = [controls];
	return options;
}

// ---- Writing an answer ------------------------------------------------------------------------

function notesInRange(clip) {
	return JSON.parse(clip.call("get_notes_extended", 0, ALL_PITCHES, last.startBeats,
		last.endBeats - last.startBeats)).notes;
}

function clearRange(clip) {
	clip.call("remove_notes_extended", 0, ALL_PITCHES, last.startBeats, last.endBeats - last.startBeats);
}

// Adds notes in the first argument form after which the range holds more than `before` notes (refusing
// a form, Live may throw or take nothing); "" when one did, else what each form met.
function addNotes(clip, notes, before) {
	var problems = [];
	for (var i = 0; i < NOTE_ARGUMENT_FORMS.length; i++) {
		var form = NOTE_ARGUMENT_FORMS[i];
		var problem = form.name + " added no note";
		try {
			clip.call("add_new_notes", form.make(notes));
		} catch (error) {
			problem = form.name + ": " + error.message;
		}
		if (notesInRange(clip).length > before) {
			NOTE_ARGUMENT_FORMS.unshift(NOTE_ARGUMENT_FORMS.splice(i, 1)[0]);
			return "";
		}
		problems.push(problem);
	}
	return problems.join("; ");
}

// The candidate note to add first: one starting where no note of its pitch starts, so that it adds a note
// whatever Live does with same-pitch overlaps (not documented); the first one if there is none.
function firstNewNote(notes, originals) {
	for (var i = 0; i < notes.length; i++) {
		var coincides = originals.some(function (original) {
			return original.pitch === notes[i].pitch && Math.abs(original.start_time - notes[i].start_time) < BEATS_EPSILON;
		});
		if (!coincides) return notes[i];
	}
	return notes[0];
}

// A note as add_new_notes takes it: every field Live gave but its note_id.
function withoutNoteId(note) {
	var copy = {};
	for (var field in note) {
		if (field !== "note_id") copy[field] = note[field];
	}
	return copy;
}

// Replaces the notes that start inside the range by the candidate's; true when they are in the clip.
// One of its notes goes in before the range is emptied: if Live takes it in no form, nothing is removed.
// If Live then takes none of the others, the notes that were there are put back in the form it took.
function writeCandidate(index) {
	var clip = new LiveAPI("id " + last.clipId);
	if (!exists(clip)) {
		showStatus("the clip was deleted");
		return false;
	}
	var notes = last.candidates[index].tracks[0].notes.map(function (note) {
		return { pitch: note[2], start_time: note[0] - last.offsetBeats, duration: note[1], velocity: note[3], mute: 0 };
	});
	var originals = notesInRange(clip);
	var refused = notes.length > 0 ? addNotes(clip, [firstNewNote(notes, originals)], originals.length) : "";
	if (refused) {
		post("CMI: Live refused the new notes (add_new_notes with " + refused + "); nothing was removed\n");
		showStatus("Live refused the new notes; your notes are as they were (the Max console says why)");
		last.chosen = null;
		return false;
	}
	clearRange(clip);
	refused = notes.length > 0 ? addNotes(clip, notes, 0) : "";
	if (!refused) {
		last.chosen = index;
		return true;
	}
	post("CMI: Live refused the new notes (add_new_notes with " + refused + ")\n");
	var restoreProblem = originals.length > 0 ? addNotes(clip, originals.map(withoutNoteId), 0) : "";
	if (restoreProblem) {
		post("CMI: putting the " + originals.length + " notes back failed too (" + restoreProblem + ")\n");
		showStatus("Live refused the new notes and the old ones could not be put back: undo (Cmd/Ctrl-Z) "
			+ "restores them; the Max console says why");
	} else {
		showStatus("Live refused the new notes; your notes are as they were (the Max console says why)");
	}
	last.chosen = null;
	return false;
}

function sendInfill(request) {
	showStatus("infilling beats " + request.startBeats + "-" + request.endBeats + " ...");
	sendRequest("infill", request.content, request.content.timeout_ms + REPLY_MARGIN_MS, function (reply) {
		link.model = reply.model;
		last = request;
		last.candidates = reply.candidates;
		showCandidates(reply.candidates);
		if (writeCandidate(0)) showStatus("candidate 1 of " + reply.candidates.length);
	});
}

// ---- Messages from the patcher ----------------------------------------------------------------

// Asks the daemon for its model and limits; then(limits) runs once they are known.
function sayHello(then) {
	sendRequest("hello", {}, SHORT_REPLY_TIMEOUT_MS, function (reply) {
		link.model = reply.model.name;
		var limits = reply.limits || {};
		var missing = NEEDED_LIMITS.filter(function (name) { return !(name in limits); });
		if (missing.length > 0) {
			link.limits = null;
			showStatus("the CMI daemon is older than this device (its hello lacks " + missing.join(", ")
				+ "): restart it from the CMI this device came with");
			return;
		}
		link.limits = limits;
		showStatus();
		if (then) then(limits);
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

// Infill uses the limits of the last hello; when none has been answered yet, it says hello first.
function infill() {
	if (!device) return;
	var clip = shownClip();
	if (!clip) return;
	var proceed = function (limits) {
		var request = infillRequest(clip, limits);
		if (request) sendInfill(request);
	};
	if (link.limits) proceed(link.limits);
	else sayHello(proceed);
}

// The same range with the same session: the daemon takes the repeat as "not this".
function again() {
	if (!last) {
		showStatus("press Infill first");
		return;
	}
	var request = { clipId: last.clipId, limits: last.limits, offsetBeats: last.offsetBeats,
		startBeats: last.startBeats, endBeats: last.endBeats, content: JSON.parse(JSON.stringify(last.content)) };
	request.content.options = infillOptions(last.limits);
	sendInfill(request);
}

function keep() {
	if (!last) {
		showStatus("press Infill first");
		return;
	}
	var chosen = last.chosen;
	if (chosen === null) {
		showStatus("no candidate is in the clip: choose one in the menu first");
		return;
	}
	sendRequest("feedback", { session: last.content.session, verdict: "accept", candidate: chosen },
		SHORT_REPLY_TIMEOUT_MS, function () { showStatus("kept candidate " + (chosen + 1)); });
}

function candidate(index) {
	if (!last || index < 0 || index >= last.candidates.length || index === last.chosen) return;
	if (writeCandidate(index)) showStatus("candidate " + (index + 1) + " of " + last.candidates.length);
}

// Called by Max when the device is removed.
function notifydeleted() {
	outlet(NODE_OUTLET, "close");
}

function control(name, newValue) {
	if (!(name in controlValues)) return;
	controlValues[name] = name === "grid" ? Math.max(0, Math.min(GRID_CHOICES.length - 1, Math.round(newValue)))
		: Math.max(0, newValue);
}

function temperature(newTemperature) {
	temperatureValue = Math.max(0, newTemperature);
}

function repeats(newValue) {
	followRepeatValue = Math.max(0, Math.min(1, newValue));
}
