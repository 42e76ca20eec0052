"""An audit hook for any point: one line per run in audit.log (in the session's workdir); it allows."""
import json
import sys

data = json.load(sys.stdin)
with open("audit.log", "a") as log:
    log.write(f"{data['hook_event_name']} {data['session_id']} {data.get('status', '')}\n")
