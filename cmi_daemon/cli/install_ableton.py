"""`cmi-daemon install ableton`: copy the CMI Max for Live device into Live's User Library.

The device (CMI.amxd) and the scripts it loads (cmi-live.js, cmi-node.js, cmi-client.js) go into
one folder of the User Library, with package.json and package-lock.json; `npm ci --omit=dev` run in
that folder then puts the node_modules the node.script part needs (zeromq, @msgpack/msgpack) next
to them. The files are bridges/ableton, installed with the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..errors import CMIError
from ..files import write_bytes_atomic
from ..paths import bridge_dir

DEVICE_FILES = ("CMI.amxd", "cmi-live.js", "cmi-node.js", "cmi-client.js", "package.json", "package-lock.json")
DEVICE_FOLDER = Path("Presets", "MIDI Effects", "Max MIDI Effect", "CMI")
NODE_MODULES = "node_modules"
NPM_ARGS = ("ci", "--omit=dev", "--no-audit", "--no-fund")


def default_source() -> Path:
    """The device's files as installed with CMI (or in the source checkout it runs from)."""
    return bridge_dir("ableton", DEVICE_FILES)


def default_user_library(platform: str = sys.platform, home: Optional[Path] = None) -> Path:
    """Live's default User Library folder; Live does not run on Linux, so there is none there."""
    home = home or Path.home()
    if platform == "darwin":
        return home / "Music" / "Ableton" / "User Library"
    if platform == "win32":
        return Path(os.environ.get("USERPROFILE", home)) / "Documents" / "Ableton" / "User Library"
    raise CMIError("Ableton Live does not run on this system, so there is no default User Library: "
                   "pass --path USER_LIBRARY")


def device_folder(user_library: Path) -> Path:
    if not user_library.is_dir():
        raise CMIError(f"{user_library}: no such folder; pass Live's User Library with --path "
                       "(Live shows it in Settings > Library)")
    return user_library / DEVICE_FOLDER


def install(user_library: Path, source: Path, run_npm: bool = True) -> Path:
    """Copy the device's files atomically into the User Library and install its Node modules."""
    target = device_folder(user_library)
    missing = [name for name in DEVICE_FILES if not (source / name).is_file()]
    if missing:
        raise CMIError(f"{source}: the Ableton device's files are missing ({', '.join(missing)}); run this "
                       "again after reinstalling CMI, or pass --source CLONE/bridges/ableton")
    for name in DEVICE_FILES:
        write_bytes_atomic(target / name, (source / name).read_bytes())
    if run_npm:
        install_node_modules(target)
    return target


def install_node_modules(folder: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise CMIError(f"npm was not found: install Node.js (which brings npm), then run "
                       f"`npm {' '.join(NPM_ARGS)}` in {folder}")
    result = subprocess.run([npm, *NPM_ARGS], cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise CMIError(f"`npm {' '.join(NPM_ARGS)}` failed in {folder}:\n{result.stderr.strip()}")


def uninstall(user_library: Path) -> Optional[Path]:
    """Remove the files install() put there (and the folder, when nothing else is left in it)."""
    target = device_folder(user_library)
    if not target.is_dir():
        return None
    for name in DEVICE_FILES:
        (target / name).unlink(missing_ok=True)
    shutil.rmtree(target / NODE_MODULES, ignore_errors=True)
    if not any(target.iterdir()):
        target.rmdir()
    return target


def usage(target: Path) -> str:
    """How a musician adds the installed device to a track."""
    return "\n".join([
        f"installed the CMI device in {target}",
        "In Live: in the browser, open User Library > Presets > MIDI Effects > Max MIDI Effect > CMI and",
        "drag CMI.amxd onto a MIDI track. Start the daemon (`cmi-daemon start`), show a MIDI clip of",
        "that track, set its loop around the bars to infill (or select notes in them) and press Infill.",
    ])
