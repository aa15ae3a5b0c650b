"""SwanLab tracking that never stops a run: no login prompt, cloud only with credentials, off costs nothing."""

import os
from pathlib import Path

MODES = ("auto", "cloud", "local", "offline", "disabled")


def logged_in() -> bool:
    """Credentials SwanLab would use: SWANLAB_API_KEY, or what `swanlab login` saved."""
    home = Path(os.environ.get("SWANLAB_ROOT", Path.home() / ".swanlab"))
    saved = [Path.cwd() / ".swanlab" / ".netrc", home / ".netrc"]
    return bool(os.environ.get("SWANLAB_API_KEY")) or any(p.is_file() for p in saved)


def resolve_mode(requested: str) -> tuple[str, str]:
    """(mode, a line saying what it means for the user). Cloud without credentials would prompt for a key, and
    without a terminal crash: it becomes local, and the line says so."""
    if requested == "disabled":
        return "disabled", ""
    if requested in ("auto", "cloud") and logged_in():
        return "cloud", "SwanLab: logging to the cloud"
    if requested == "cloud":
        return "local", ("SwanLab: --swanlab_mode=cloud, but no login found (set SWANLAB_API_KEY or run `swanlab "
                         "login`): logging locally to ./swanlog instead")
    if requested == "offline":
        return "offline", "SwanLab: offline, logs in ./swanlog; upload them later with `swanlab sync`"
    return "local", ("SwanLab: no login found, logging locally to ./swanlog. View with `swanlab watch ./swanlog` "
                     "(pip install 'swanlab[dashboard]'); log in with `swanlab login` for the cloud.")


class Tracker:
    """One run's SwanLab logging; every method does nothing when tracking is off."""

    def __init__(self, requested: str, project: str, experiment: str, config: dict, enabled: bool = True):
        self.mode, self.message = resolve_mode(requested) if enabled else ("disabled", "")
        self.callbacks = []
        if self.mode != "disabled":
            from swanlab.integration.transformers import SwanLabCallback
            callback = SwanLabCallback(project=project, experiment_name=experiment, mode=self.mode)
            callback.update_config(config)
            self.callbacks.append(callback)

    def log(self, values: dict):
        if self.mode != "disabled":
            import swanlab
            swanlab.log(values)

    def finish(self):
        if self.mode != "disabled":
            import swanlab
            swanlab.finish()
