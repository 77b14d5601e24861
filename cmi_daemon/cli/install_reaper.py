"""`cmi-daemon install reaper`: put the CMI actions into REAPER and point its Python at this one.

Copies bridges/reaper into <resource folder>/Scripts/CMI, registers the two actions in
reaper-kb.ini, and sets reaper.ini's ReaScript Python keys to this interpreter's libpython,
recording this interpreter's import paths in Scripts/CMI/cmi_python.json for the actions.
reaper.ini is backed up first (reaper.ini.cmi-backup); `--uninstall` restores the keys from that
backup, removes the action lines and the scripts. REAPER rewrites reaper.ini when it quits, so
both refuse while REAPER runs. Every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Optional

import psutil

from ..errors import CMIError
from ..files import write_bytes_atomic
from ..paths import bridge_dir

SCRIPT_FILES = ("cmi_reaper.py", "cmi_infill_selection.py", "cmi_accept_infill.py", "cmi_infill_settings.py")
ACTIONS = (("cmi_infill_selection.py", "CMI: Infill selection"), ("cmi_accept_infill.py", "CMI: Accept infill"),
           ("cmi_infill_settings.py", "CMI: Infill settings"))
SCRIPTS_FOLDER = ("Scripts", "CMI")
PATHS_FILE_NAME = "cmi_python.json"
MANIFEST_FILE_NAME = "cmi-install.json"
INI_FILE_NAME = "reaper.ini"
KB_FILE_NAME = "reaper-kb.ini"
BACKUP_SUFFIX = ".cmi-backup"
INI_SECTION = "REAPER"
INI_KEYS = ("reascript", "pythonlibpath64", "pythonlibdll64")
MAIN_SECTION_ID = 0
KB_SCRIPT_FLAGS = 4
PROCESS_NAMES = ("reaper", "reaper.exe")


# ----- where things are -----

def default_resource_dir() -> Path:
    """REAPER's resource folder: %APPDATA%\\REAPER, ~/Library/Application Support/REAPER or ~/.config/REAPER."""
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "REAPER"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "REAPER"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "REAPER"


def python_library() -> Path:
    """This interpreter's shared libpython, which REAPER loads to run Python ReaScripts."""
    config = sysconfig.get_config_var
    version = config("VERSION") or f"{sys.version_info[0]}.{sys.version_info[1]}"
    names = [config("LDLIBRARY"), config("INSTSONAME"), f"python{version.replace('.', '')}.dll",
             f"libpython{version}.dylib", f"libpython{version}.so"]
    folders = [config("LIBDIR"), config("PYTHONFRAMEWORKPREFIX"), sys.base_prefix,
               os.path.join(sys.base_prefix, "lib")]
    for folder in filter(None, folders):
        for name in filter(None, names):
            path = Path(folder) / name
            if path.is_file():
                return path
    raise CMIError(f"this Python ({sys.executable}) has no shared library (libpython) for REAPER to load; "
                   "install CMI with a Python that has one (python.org installers, Homebrew, a Linux "
                   "distribution's python3, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared) and run again")


def import_paths() -> list[str]:
    """Folders REAPER's Python needs on sys.path to import cmi_daemon.client, pyzmq, msgpack, psutil
    and appdirs."""
    import appdirs
    import msgpack
    import zmq

    folders = [Path(__file__).resolve().parents[2], Path(sysconfig.get_paths()["purelib"]),
               Path(sysconfig.get_paths()["platlib"])]
    folders += [Path(module.__file__).resolve().parent.parent for module in (zmq, msgpack, psutil)]
    folders.append(Path(appdirs.__file__).resolve().parent)
    unique: list[str] = []
    for folder in folders:
        if str(folder) not in unique:
            unique.append(str(folder))
    return unique


def is_reaper_running() -> bool:
    """Whether a process named reaper (REAPER on macOS, reaper.exe on Windows) runs, any user's."""
    return any((process.info["name"] or "").lower() in PROCESS_NAMES for process in psutil.process_iter(["name"]))


# ----- reaper.ini, edited line by line so everything else stays byte for byte -----

def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _section_span(lines: list[str], section: str) -> Optional[tuple[int, int]]:
    """(index of the header, index after the section's last line) or None."""
    header = f"[{section}]".lower()
    for start, line in enumerate(lines):
        if line.strip().lower() == header:
            end = start + 1
            while end < len(lines) and not lines[end].lstrip().startswith("["):
                end += 1
            return start, end
    return None


def _key_index(lines: list[str], span: tuple[int, int], key: str) -> Optional[int]:
    for index in range(span[0] + 1, span[1]):
        if "=" in lines[index] and lines[index].split("=", 1)[0].strip().lower() == key.lower():
            return index
    return None


def ini_value(text: str, section: str, key: str) -> Optional[str]:
    lines = text.splitlines(keepends=True)
    span = _section_span(lines, section)
    index = _key_index(lines, span, key) if span else None
    return None if index is None else lines[index].split("=", 1)[1].rstrip("\r\n")


def ini_with(text: str, section: str, key: str, value: Optional[str]) -> str:
    """text with key set to value in place (or after the section's last line), or removed when value is None."""
    newline = _newline(text)
    lines = text.splitlines(keepends=True)
    span = _section_span(lines, section)
    if span is None:
        raise CMIError(f"{INI_FILE_NAME} has no [{section}] section; is this REAPER's resource folder?")
    index = _key_index(lines, span, key)
    if value is None:
        if index is not None:
            removed = lines.pop(index)
            if index == len(lines) and not removed.endswith("\n") and lines:
                lines[-1] = lines[-1].rstrip("\r\n")
        return "".join(lines)
    if index is not None:
        ending = lines[index][len(lines[index].rstrip("\r\n")):]
        lines[index] = f"{key}={value}{ending}"
        return "".join(lines)
    last = span[1] - 1
    while last > span[0] and not lines[last].strip():
        last -= 1
    if lines[last].endswith("\n"):
        lines.insert(last + 1, f"{key}={value}{newline}")
    else:
        lines[last] += newline
        lines.insert(last + 1, f"{key}={value}")
    return "".join(lines)


# ----- reaper-kb.ini -----

def action_id(script_name: str) -> str:
    """A stable command id (REAPER's form: RS + 40 hex digits) per script, the same on every install."""
    return "RS" + hashlib.sha1(f"cmi-reaper/{script_name}".encode("utf-8")).hexdigest()


def kb_line(script_path: Path, action_name: str) -> str:
    return (f'SCR {KB_SCRIPT_FLAGS} {MAIN_SECTION_ID} {action_id(script_path.name)} '
            f'"Custom: {action_name}" "{script_path}"')


def _is_cmi_kb_line(line: str) -> bool:
    fields = line.split()
    return len(fields) > 3 and fields[0] == "SCR" and fields[3] in {action_id(name) for name, _ in ACTIONS}


def kb_without_cmi(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not _is_cmi_kb_line(line))


def kb_with_cmi(text: str, scripts_dir: Path) -> str:
    text = kb_without_cmi(text)
    newline = _newline(text)
    if text and not text.endswith("\n"):
        text += newline
    return text + "".join(kb_line(scripts_dir / name, action) + newline for name, action in ACTIONS)


# ----- install / uninstall -----

def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _refuse_while_running(running: Callable[[], bool]) -> None:
    if running():
        raise CMIError("REAPER is running; quit it first (it rewrites reaper.ini when it quits), then run this again")


def _checked_resource_dir(resource_dir: Optional[Path]) -> Path:
    folder = Path(resource_dir) if resource_dir is not None else default_resource_dir()
    if not (folder / INI_FILE_NAME).is_file():
        raise CMIError(f"no {INI_FILE_NAME} in {folder}: start REAPER once so that it creates its resource folder, "
                       "quit it, and run this again (or pass --path with REAPER's resource folder)")
    return folder


def install(resource_dir: Optional[Path] = None, running: Callable[[], bool] = is_reaper_running) -> list[str]:
    """Install into REAPER's resource folder; returns what was done, one line each."""
    _refuse_while_running(running)
    folder = _checked_resource_dir(resource_dir)
    source_dir, library = bridge_dir("reaper", SCRIPT_FILES), python_library()
    scripts_dir = folder.joinpath(*SCRIPTS_FOLDER)
    ini_path, kb_path = folder / INI_FILE_NAME, folder / KB_FILE_NAME
    manifest_path = scripts_dir / MANIFEST_FILE_NAME

    ini_text = _read_text(ini_path)
    backup_path = ini_path.with_name(INI_FILE_NAME + BACKUP_SUFFIX)
    if not backup_path.exists():
        write_bytes_atomic(backup_path, ini_path.read_bytes())
    library_value = str(library) if os.name == "nt" else library.name
    for key, value in zip(INI_KEYS, ("1", str(library.parent), library_value)):
        ini_text = ini_with(ini_text, INI_SECTION, key, value)

    kb_text = _read_text(kb_path)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {
        "kb_existed": kb_text is not None,
        "kb_ended_with_newline": kb_text is None or kb_text == "" or kb_text.endswith("\n")}

    for name in SCRIPT_FILES:
        write_bytes_atomic(scripts_dir / name, (source_dir / name).read_bytes())
    _write_text(scripts_dir / PATHS_FILE_NAME,
                json.dumps({"python": sys.executable, "sys_path": import_paths()}, indent=1))
    _write_text(manifest_path, json.dumps(manifest, indent=1))
    _write_text(kb_path, kb_with_cmi(kb_text or "", scripts_dir))
    _write_text(ini_path, ini_text)
    return [f"scripts: {scripts_dir}",
            f"actions in {kb_path}: " + ", ".join(f'"{action}" (_{action_id(name)})' for name, action in ACTIONS),
            f"REAPER's Python in {ini_path}: {library} (reaper.ini backed up as {backup_path.name})"]


def uninstall(resource_dir: Optional[Path] = None, running: Callable[[], bool] = is_reaper_running) -> list[str]:
    """Undo install: reaper.ini keys as they were in the backup, no action lines, no scripts."""
    _refuse_while_running(running)
    folder = _checked_resource_dir(resource_dir)
    scripts_dir = folder.joinpath(*SCRIPTS_FOLDER)
    ini_path, kb_path = folder / INI_FILE_NAME, folder / KB_FILE_NAME
    backup_path = ini_path.with_name(INI_FILE_NAME + BACKUP_SUFFIX)
    manifest_path = scripts_dir / MANIFEST_FILE_NAME
    done = []

    if backup_path.is_file():
        backup_text, ini_text = _read_text(backup_path), _read_text(ini_path)
        for key in INI_KEYS:
            ini_text = ini_with(ini_text, INI_SECTION, key, ini_value(backup_text, INI_SECTION, key))
        _write_text(ini_path, ini_text)
        backup_path.unlink()
        done.append(f"REAPER's Python settings in {ini_path} restored from {backup_path.name}")

    kb_text = _read_text(kb_path)
    if kb_text is not None:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {
            "kb_existed": True, "kb_ended_with_newline": True}
        kb_text = kb_without_cmi(kb_text)
        if not manifest["kb_ended_with_newline"] and kb_text.endswith("\n"):
            kb_text = kb_text.rstrip("\r\n")
        if kb_text == "" and not manifest["kb_existed"]:
            kb_path.unlink()
        else:
            _write_text(kb_path, kb_text)
        done.append(f"CMI actions removed from {kb_path}")

    if scripts_dir.exists():
        shutil.rmtree(scripts_dir)
        if not any(scripts_dir.parent.iterdir()):
            scripts_dir.parent.rmdir()
        done.append(f"scripts removed: {scripts_dir}")
    return done or [f"CMI is not installed in {folder}"]
