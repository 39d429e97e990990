"""Closed-loop load with wrk: each connection sends its next request as soon as
the previous one is answered. A Lua script builds every body, so each request
carries new messageIds (the service would count repeats as duplicates)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from bench import bodies

# Body builders in Lua mirroring bench/bodies.py (same fields, same users).
LUA = r"""
local kind, phase, path, auth = "%(kind)s", "%(phase)s", "%(path)s", "%(auth)s"
local users, per_request = %(users)d, %(per_request)d
local next_thread = 1
local n = 0

function setup(thread)
  thread:set("sender", next_thread)
  next_thread = next_thread + 1
end

local function track(i)
  local tok = string.format("bk_%%s_%%d_%%d", phase, sender, i)
  return string.format(
    '{"type":"track","event":"Bench Event","userId":"user-%%d","messageId":"%%s",' ..
    '"timestamp":"%(timestamp)s","properties":{"bench":"%%s","plan":"pro","amount":12.5,"items":3},' ..
    '"context":{"ip":"127.0.0.1","library":{"name":"bench","version":"1"}}}',
    (i + sender * 7919) %% users, tok, tok)
end

local function webhook(i)
  local tok = string.format("bk_%%s_%%d_%%d", phase, sender, i)
  local user = (i + sender * 7919) %% users
  return string.format(
    '{"type":"delivered","delivered_at":%%d,"message_id":"%%s",' ..
    '"user":{"id":"user-%%d","email":"user-%%d@example.com"},' ..
    '"campaign":{"id":"c-1","name":"Bench campaign","subject":"Hello","type":"newsletter"}}',
    %(webhook_time)d + i, tok, user, user)
end

function request()
  local body
  if kind == "batch" then
    local items = {}
    for k = 1, per_request do
      n = n + 1
      items[k] = track(n)
    end
    body = '{"batch":[' .. table.concat(items, ",") .. '],"context":{"library":{"name":"bench","version":"1"}}}'
  else
    n = n + 1
    if kind == "webhook" then body = webhook(n) else body = track(n) end
  end
  local headers = {["Content-Type"] = "application/json"}
  if auth ~= "" then headers["Authorization"] = auth end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int  # non-2xx/3xx answers, plus connect/read/write errors and timeouts
    p50_ms: float
    p99_ms: float

    @property
    def ok_per_second(self) -> float:
        return (self.requests - self.errors) / self.seconds


def script(out_dir: str, kind: str, phase: str, path: str, auth: str, per_request: int = 1) -> str:
    text = LUA % {
        "kind": kind,
        "phase": phase,
        "path": path,
        "auth": auth,
        "users": bodies.USERS,
        "per_request": per_request,
        "timestamp": bodies.TIMESTAMP,
        "webhook_time": bodies.WEBHOOK_TIME,
    }
    path_ = os.path.join(out_dir, f"wrk-{phase}.lua")
    with open(path_, "w") as handle:
        handle.write(text)
    return path_


def run(
    url: str, script_path: str, connections: int, seconds: float, threads: int = 2
) -> WrkResult:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(int(seconds), 1)}s",
        "--timeout",
        "10s",
        "-s",
        script_path,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            raw = json.loads(line[len("WRK_RESULT ") :])
            errors = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
            return WrkResult(
                raw["requests"],
                raw["duration_us"] / 1e6,
                errors,
                raw["p50_us"] / 1000,
                raw["p99_us"] / 1000,
            )
    raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")
