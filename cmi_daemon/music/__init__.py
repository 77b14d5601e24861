"""MIDI and its token form: vocabulary, tempo and meter, songs, regions, roles, editing a file."""
