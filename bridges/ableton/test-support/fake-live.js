// A fake Live set and LiveAPI class for the device's tests, behaving as /work/shared/docs/daw-apis.md
// section B describes Live: id "0" for missing objects, get() answering arrays, object properties as
// flat ["id", N] lists, clip-relative beats with loop and marker properties, pitch-first
// get_notes_extended answering a pitch-sorted JSON string of 9-field notes, add_new_notes refusing
// note_id, apply_note_modifications requiring it. The deprecated get_notes/set_notes throw, so a test
// fails if the device uses them. Which argument form add_new_notes takes (a JSON string or an object) is
// not documented, so a test can make it refuse either form, or both (refuseNotes).
"use strict";

const NOTE_DEFAULTS = { velocity: 100, mute: 0, probability: 1, velocity_deviation: 0, release_velocity: 64 };
const NOTE_FIELDS = ["note_id", "pitch", "start_time", "duration", "velocity", "mute", "probability",
  "velocity_deviation", "release_velocity"];

class FakeLiveSet {
  constructor({ tempoBpm = 120, numerator = 4, denominator = 4 } = {}) {
    this.objects = new Map();
    this.nextId = 1;
    this.nextNoteId = 1;
    this.calls = [];
    this.noteRefusal = null;
    this.song = this.add("Song", null, { tempo: tempoBpm, signature_numerator: numerator,
      signature_denominator: denominator, tracks: [] });
    this.view = this.add("Song.View", this.song, { detail_clip: null });
  }

  add(type, parent, props) {
    const object = { id: this.nextId++, type, parent, props };
    this.objects.set(object.id, object);
    return object;
  }

  addTrack(name) {
    const track = this.add("Track", this.song, { name, clip_slots: [], arrangement_clips: [], devices: [] });
    this.song.props.tracks.push(track);
    return track;
  }

  addDevice(track) {
    const device = this.add("MaxDevice", track, { name: "CMI", type: 4, can_have_drum_pads: 0 });
    track.props.devices.push(device);
    return device;
  }

  // An instrument after the devices already on the track: a Drum Rack (class DrumGroupDevice, which can
  // have drum pads) or another instrument.
  addInstrument(track, { drumRack = false } = {}) {
    const instrument = this.add(drumRack ? "RackDevice" : "Device", track, {
      name: drumRack ? "Drum Rack" : "Electric", type: 1, can_have_drum_pads: drumRack ? 1 : 0,
      class_name: drumRack ? "DrumGroupDevice" : "LoungeLizard" });
    track.props.devices.push(instrument);
    return instrument;
  }

  clipProps(notes, { lengthBeats, loopStartBeats = 0, loopEndBeats = lengthBeats, startMarkerBeats = 0 }) {
    return {
      is_midi_clip: 1, length: lengthBeats, looping: 1, loop_start: loopStartBeats, loop_end: loopEndBeats,
      start_marker: startMarkerBeats, end_marker: lengthBeats, signature_numerator: 4, signature_denominator: 4,
      name: "clip", notes: notes.map((note) => this.newNote(note)),
    };
  }

  addSessionClip(track, notes, options) {
    const slot = this.add("ClipSlot", track, { clip: null, has_clip: 1 });
    track.props.clip_slots.push(slot);
    slot.props.clip = this.add("Clip", slot, { ...this.clipProps(notes, options), is_arrangement_clip: 0 });
    return slot.props.clip;
  }

  addArrangementClip(track, notes, { startTimeBeats, ...options }) {
    const clip = this.add("Clip", track, { ...this.clipProps(notes, options), is_arrangement_clip: 1,
      start_time: startTimeBeats, end_time: startTimeBeats + options.lengthBeats });
    track.props.arrangement_clips.push(clip);
    return clip;
  }

  showClip(clip) {
    this.view.props.detail_clip = clip;
  }

  // From now on add_new_notes refuses a {notes} argument of one of `forms` ("string", "object") holding
  // at least minNotes notes: it throws, or (how "silent") returns having added nothing. null: it refuses none.
  refuseNotes(forms, { how = "throw", minNotes = 1 } = {}) {
    this.noteRefusal = forms && { forms, how, minNotes };
  }

  newNote(note) {
    return { ...NOTE_DEFAULTS, ...note, note_id: this.nextNoteId++, selected: Boolean(note.selected) };
  }

  // Canonical paths resolved from the root objects; this_device is the device asking.
  resolve(path, thisDevice) {
    const words = path.trim().split(/\s+/);
    if (words[0] === "id") return this.objects.get(Number(words[1])) || null;
    let object = { live_set: this.song, this_device: thisDevice }[words[0]] || null;
    for (let i = 1; object && i < words.length; i++) {
      if (words[i] === "view" && object === this.song) {
        object = this.view;
        continue;
      }
      const value = object.props[words[i]];
      object = Array.isArray(value) ? value[Number(words[++i])] || null : value || null;
    }
    return object;
  }
}

function checkWindow(args) {
  if (args.length !== 4 || !args.every((a) => typeof a === "number" && Number.isFinite(a))) {
    throw new Error(`expected (from_pitch, pitch_span, from_time, time_span), got ${JSON.stringify(args)}`);
  }
  const [fromPitch, pitchSpan, fromBeats, spanBeats] = args;
  if (!Number.isInteger(fromPitch) || !Number.isInteger(pitchSpan)) throw new Error("pitch arguments come first");
  return (note) => note.pitch >= fromPitch && note.pitch < fromPitch + pitchSpan
    && note.start_time >= fromBeats && note.start_time < fromBeats + spanBeats;
}

function notesJson(notes) {
  const sorted = [...notes].sort((a, b) => a.pitch - b.pitch || a.start_time - b.start_time);
  return JSON.stringify({ notes: sorted.map((note) => Object.fromEntries(NOTE_FIELDS.map((f) => [f, note[f]]))) });
}

function notesArgument(argument) {
  const parsed = typeof argument === "string" ? JSON.parse(argument) : argument;
  if (!parsed || !Array.isArray(parsed.notes)) throw new Error("expected a {notes: [...]} dictionary");
  return parsed.notes;
}

const CLIP_FUNCTIONS = {
  get_notes_extended(live, clip, args) {
    return notesJson(clip.props.notes.filter(checkWindow(args)));
  },
  get_selected_notes_extended(live, clip, args) {
    if (args.length !== 0) throw new Error("get_selected_notes_extended takes no arguments");
    return notesJson(clip.props.notes.filter((note) => note.selected));
  },
  remove_notes_extended(live, clip, args) {
    const inWindow = checkWindow(args);
    clip.props.notes = clip.props.notes.filter((note) => !inWindow(note));
  },
  add_new_notes(live, clip, [argument]) {
    const notes = notesArgument(argument);
    const refusal = live.noteRefusal;
    const form = typeof argument === "string" ? "string" : "object";
    if (refusal && refusal.forms.includes(form) && notes.length >= refusal.minNotes) {
      if (refusal.how === "silent") return undefined;
      throw new Error(`add_new_notes: invalid syntax (a ${form} argument)`);
    }
    for (const note of notes) {
      if ("note_id" in note) throw new Error("add_new_notes: note_id is not allowed");
      for (const field of ["pitch", "start_time", "duration"]) {
        if (typeof note[field] !== "number") throw new Error(`add_new_notes: ${field} is required`);
      }
    }
    clip.props.notes.push(...notes.map((note) => live.newNote(note)));
  },
  apply_note_modifications(live, clip, [argument]) {
    for (const change of notesArgument(argument)) {
      const note = clip.props.notes.find((n) => n.note_id === change.note_id);
      if (!note) throw new Error("apply_note_modifications: each note needs the note_id of an existing note");
      Object.assign(note, change);
    }
  },
  get_notes() {
    throw new Error("get_notes is deprecated: use get_notes_extended");
  },
  set_notes() {
    throw new Error("set_notes is deprecated: use add_new_notes");
  },
};

function getAnswer(value) {
  if (value === null || value === undefined) return ["id", 0];
  if (Array.isArray(value)) return value.flatMap((object) => ["id", object.id]);
  if (typeof value === "object") return ["id", value.id];
  return [value];
}

// The LiveAPI class one device's [js] sees (its this_device is `device`).
function liveApiClass(live, device) {
  return class LiveAPI {
    constructor(first, second) {
      const path = typeof first === "function" ? second : first;
      this.object = live.resolve(String(path), device);
      this.id = this.object ? String(this.object.id) : "0";
      this.type = this.object ? this.object.type : "";
    }

    target() {
      if (!this.object) throw new Error("LiveAPI: invalid object id 0");
      return this.object;
    }

    get(property) {
      const object = this.target();
      if (property === "canonical_parent") return getAnswer(object.parent);
      if (!(property in object.props) || property === "notes") throw new Error(`${object.type} has no property ${property}`);
      return getAnswer(object.props[property]);
    }

    set(property, value) {
      const object = this.target();
      if (!(property in object.props)) throw new Error(`${object.type} has no property ${property}`);
      object.props[property] = value;
    }

    call(name, ...args) {
      const object = this.target();
      if (object.type !== "Clip" || !CLIP_FUNCTIONS[name]) throw new Error(`${object.type} has no function ${name}`);
      live.calls.push({ clip: object.id, name, args });
      return CLIP_FUNCTIONS[name](live, object, args);
    }
  };
}

module.exports = { FakeLiveSet, liveApiClass };
