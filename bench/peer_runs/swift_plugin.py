"""ms-swift's way in for a callback of one's own: `--external_plugins swift_plugin.py --callbacks step_clock`
imports this file, which names bench/peer_runs/step_clock.py's StepClock in ms-swift's callbacks_map."""

import sys
from pathlib import Path

from swift.callbacks import callbacks_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_clock import StepClock  # noqa: E402

callbacks_map["step_clock"] = StepClock
