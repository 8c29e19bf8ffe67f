"""Soak test of the main job: SIGKILL it at random moments, resume, compare.

A reference run of the job (by default the quick main job) gives the
expected results and the length of a run, T. Then chains of runs, each in a
fresh workdir: 1 … `max_kills_per_chain` runs, each SIGKILLed at a random
moment t ~ U(0, T) after its launch ('time' kills) or at the first file
event after t (a file appearing, replaced or removed: 'event' kills, the
moments a crash is most likely to catch a half-done write), then one run
left to finish. Each chain's finished results must equal the reference's:
results.json without its timings and resume flags (`normalize`), and every
tensor of factors.safetensors bit for bit.

Reported: kills tried (runs really SIGKILLed) and survived (the runs after
them resumed and the chain ended identical), what each kill hit (the last
file event before it), and the bytes of finished work recomputed: files of
resumable work (the run store's statistics and layers in progress/, and the
cached dense evaluation dense.json) that were complete and valid when a run
was killed and were written again by a later run of the chain (0 if
resuming never redoes finished work). The compressed model, the factors and
the results are written again by every run that gets to them: they are the
job's outputs, not work it resumes.
"""

import fnmatch
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import matplotlib
import numpy as np
import safetensors.numpy

from ctxlr import results
from ctxlr import store as store_lib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys of results.json that change from run to run by design.
VOLATILE = frozenset(
    {
        'seconds',
        'wall_seconds',
        'disk_bytes',
        'dense_eval_reused',
        'stats_resumed',
        'resumed',
        'tokens_per_second',
    }
)
# What a kill hit: the phase of the last file event before it. Temporary
# files (`*.tmp`, and safetensors' own `.tmp??????`) count as the file they
# become, whose write was under way; their removal is that file's rename.
PHASES = (
    ('config.json*', 'started'),
    ('dense.json*', 'dense evaluation cached'),
    ('progress/.tmp*', 'saving statistics'),
    ('progress', 'calibrating'),
    ('progress/layers', 'calibrating'),
    ('progress/manifest.json*', 'calibrating'),
    ('progress/stats.safetensors*', 'saving statistics'),
    ('progress/layers/*', 'solving layers'),
    ('model', 'saving the model'),
    ('model/*', 'saving the model'),
    ('factors.safetensors*', 'exporting factors'),
    ('.tmp*', 'exporting factors'),
    ('results.json*', 'writing results'),
    ('*', 'finishing'),  # summary.md, the figure
)
_NO_EVENT = 'starting (no file yet)'
PHASE_ORDER = (
    _NO_EVENT,
    'started',
    'dense evaluation cached',
    'calibrating',
    'saving statistics',
    'solving layers',
    'saving the model',
    'exporting factors',
    'writing results',
    'progress removed',
    'finishing',
)  # the order a run goes through them


def validate(config) -> None:
  """Raises ValueError naming the first bad field."""
  if not isinstance(config.kills, int) or config.kills < 1:
    raise ValueError(f'kills: expected an int >= 1; got {config.kills!r}.')
  if (
      not isinstance(config.max_kills_per_chain, int)
      or config.max_kills_per_chain < 1
  ):
    raise ValueError(
        'max_kills_per_chain: expected an int >= 1; got '
        f'{config.max_kills_per_chain!r}.'
    )
  if not 0 <= config.event_fraction <= 1:
    raise ValueError(
        'event_fraction: expected a number in [0, 1]; got '
        f'{config.event_fraction!r}.'
    )
  if not config.poll_seconds > 0 or not config.run_timeout > 0:
    raise ValueError(
        'poll_seconds and run_timeout must be > 0; got '
        f'{config.poll_seconds} and {config.run_timeout}.'
    )
  if ':' not in config.job and not config.job.endswith('.py'):
    raise ValueError(f'job: expected a config path[:arg]; got {config.job!r}.')


def normalize(out: Any) -> Any:
  """results.json without the keys that change by design (`VOLATILE`)."""
  if isinstance(out, dict):
    return {k: normalize(v) for k, v in out.items() if k not in VOLATILE}
  if isinstance(out, list):
    return [normalize(v) for v in out]
  return out


def snapshot(root: str) -> dict[str, tuple[int, int]]:
  """{path relative to root: (inode, size)} of every file and directory."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      try:
        st = os.lstat(path)
      except FileNotFoundError:  # removed while we looked
        continue
      out[os.path.relpath(path, root)] = (
          st.st_ino,
          0 if name in dirs else st.st_size,
      )
  return out


def finished_work_files(workdir: str) -> dict[str, tuple[int, int]]:
  """The valid, complete files of resumable work in `workdir`.

  The run-store files of progress/ (statistics and layers) that verify, and
  the cached dense evaluation dense.json if it is valid JSON.
  """
  out = {}
  for rel, (ino, size) in snapshot(workdir).items():
    path = os.path.join(workdir, rel)
    try:
      if rel.startswith('progress' + os.sep) and rel.endswith('.safetensors'):
        store_lib.read_verified(path)
      elif rel == 'dense.json':
        results.read_json(path)
      else:
        continue
    except (OSError, ValueError):
      continue
    out[rel] = (ino, size)
  return out


def phase_of(rel: str | None) -> str:
  """The phase of a run a file event (`run_once`'s `last_event`) is in."""
  if rel is None:
    return _NO_EVENT
  if rel.endswith(' (removed)'):
    rel = rel[: -len(' (removed)')]
    temporary = rel.endswith('.tmp') or os.path.basename(rel).startswith('.tmp')
    if not temporary and (rel + os.sep).startswith('progress' + os.sep):
      return 'progress removed'  # the job's clean-up after success
  for pattern, label in PHASES:
    if fnmatch.fnmatchcase(rel, pattern):
      return label
  return 'finishing'


def job_command(job: str, workdir: str, overrides=()) -> list[str]:
  return [
      sys.executable,
      'launch.py',
      f'--config={job}',
      f'--workdir={workdir}',
      *overrides,
  ]


def run_once(
    command: list[str],
    workdir: str,
    *,
    kill: Callable[[float, list[str], dict], bool] | None = None,
    watch: dict[str, tuple[int, int]] | None = None,
    poll_seconds: float = 0.005,
    timeout: float = 600.0,
    log_path: str | None = None,
) -> dict[str, Any]:
  """Runs `command` (cwd: the repository), watching `workdir`'s files.

  Args:
    command: the job (`job_command`).
    workdir: the job's workdir, polled every `poll_seconds`.
    kill: `kill(seconds since launch, paths changed since the last poll,
      snapshot)`; the job is SIGKILLed at the first poll where it is true.
    watch: {path: (inode, size)} of finished files: any of them written
      again (a new inode) is reported in `replaced`.
    poll_seconds: polling period.
    timeout: the job is killed and reported 'timeout' after this long.
    log_path: where the job's stdout and stderr go (default: discarded).

  Returns:
    dict(outcome='killed' | 'finished' | 'failed' | 'timeout', returncode,
    seconds, events=[(seconds, path, with ' (removed)' if it went)],
    last_event (the last event's path, or None),
    replaced={path: bytes}).
  """
  env = dict(os.environ)
  env.setdefault('OPENBLAS_NUM_THREADS', '1')
  log = open(log_path, 'w') if log_path else subprocess.DEVNULL
  start = time.monotonic()
  proc = subprocess.Popen(
      command,
      cwd=ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT if log_path else log,
  )
  before = snapshot(workdir) if os.path.isdir(workdir) else {}
  events, replaced, outcome = [], {}, None
  try:
    while True:
      now = time.monotonic() - start
      after = snapshot(workdir) if os.path.isdir(workdir) else {}
      changed = sorted(
          {p for p in after if before.get(p) != after[p]}
          | {p for p in before if p not in after}
      )
      events += [(now, p if p in after else f'{p} (removed)') for p in changed]
      for p in changed:
        if watch and p in watch and p in after and after[p][0] != watch[p][0]:
          replaced[p] = watch[p][1]
      if kill is not None and kill(now, changed, after):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcome = 'killed' if proc.returncode == -signal.SIGKILL else None
        break
      if proc.poll() is not None:
        break
      if now > timeout:
        proc.kill()
        proc.wait()
        outcome = 'timeout'
        break
      before = after
      time.sleep(poll_seconds)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    if log_path:
      log.close()
  if outcome is None:
    outcome = 'finished' if proc.returncode == 0 else 'failed'
  return dict(
      outcome=outcome,
      returncode=proc.returncode,
      seconds=time.monotonic() - start,
      events=events,
      last_event=events[-1][1] if events else None,
      replaced=replaced,
  )


def outcome_of(workdir: str) -> dict[str, Any]:
  """What a finished job produced: normalized results and the factors."""
  out = dict(
      results=normalize(
          results.read_json(os.path.join(workdir, 'results.json'))
      )
  )
  path = os.path.join(workdir, 'factors.safetensors')
  if os.path.exists(path):
    out['factors'] = safetensors.numpy.load_file(path)
  return out


def same_outcome(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """What differs between two `outcome_of`s ([] if identical, bit for bit)."""
  diff = []
  if a['results'] != b['results']:
    keys = sorted(
        k
        for k in set(a['results']) | set(b['results'])
        if a['results'].get(k) != b['results'].get(k)
    )
    diff.append(f'results.json differs in {keys}')
  fa, fb = a.get('factors', {}), b.get('factors', {})
  if sorted(fa) != sorted(fb):
    diff.append('factors.safetensors holds other tensors')
  else:
    bad = [
        k
        for k in fa
        if fa[k].dtype != fb[k].dtype or not np.array_equal(fa[k], fb[k])
    ]
    if bad:
      diff.append(f'factors differ in {bad[:3]}')
  return diff


def _tail(path: str, lines: int = 5) -> str:
  with open(path, errors='replace') as f:
    return ' | '.join(l.strip() for l in f.read().splitlines()[-lines:])


def run(config, workdir: str) -> None:
  """Runs the soak and writes results.json, summary.md and the figure.

  Each chain runs the job, SIGKILLs it at a random time or file event and
  reruns it until it finishes; results are compared with an unkilled
  reference run. A rerun starts the soak over.
  """
  rng = np.random.default_rng(config.seed)
  workdir = os.path.abspath(workdir)
  logs = os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  overrides = tuple(config.job_overrides)

  def job(directory):
    return job_command(config.job, directory, overrides)

  ref_dir = os.path.join(workdir, 'reference')
  shutil.rmtree(ref_dir, ignore_errors=True)
  ref = run_once(
      job(ref_dir),
      ref_dir,
      poll_seconds=config.poll_seconds,
      timeout=config.run_timeout,
      log_path=os.path.join(logs, 'reference.log'),
  )
  if ref['outcome'] != 'finished':
    raise RuntimeError(
        f'The reference run {ref["outcome"]}: '
        f'{_tail(os.path.join(logs, "reference.log"))}'
    )
  reference = outcome_of(ref_dir)
  length = ref['seconds']
  out = dict(
      job=config.job,
      overrides=list(overrides),
      reference_seconds=length,
      reference_events=len(ref['events']),
      kills=[],
      chains=[],
  )
  path = os.path.join(workdir, 'results.json')
  chain_dir = os.path.join(workdir, 'chain')
  while len(out['kills']) < config.kills:
    index = len(out['chains'])
    shutil.rmtree(chain_dir, ignore_errors=True)
    planned = int(rng.integers(1, config.max_kills_per_chain + 1))
    planned = min(planned, config.kills - len(out['kills']))
    chain = dict(index=index, planned=planned, runs=[], failures=[])
    watch, kills = {}, []
    for attempt in range(planned + 1):  # the last one is left to finish
      mode = at = kill = None
      if attempt < planned:
        mode = 'event' if rng.random() < config.event_fraction else 'time'
        at = float(rng.uniform(0, length))
        if mode == 'time':
          kill = lambda now, changed, snap, at=at: now >= at
        else:
          kill = lambda now, changed, snap, at=at: now >= at and bool(changed)
      log_path = os.path.join(logs, f'chain{index:03d}_run{attempt}.log')
      r = run_once(
          job(chain_dir),
          chain_dir,
          kill=kill,
          watch=watch,
          poll_seconds=config.poll_seconds,
          timeout=config.run_timeout,
          log_path=log_path,
      )
      if kills:  # finished work redone after that kill
        kills[-1]['recomputed_bytes'] += sum(r['replaced'].values())
        kills[-1]['recomputed_files'] += sorted(r['replaced'])
      chain['runs'].append(
          dict(
              mode=mode,
              at=at,
              outcome=r['outcome'],
              seconds=r['seconds'],
              last_event=r['last_event'],
          )
      )
      if r['outcome'] in ('failed', 'timeout'):
        chain['failures'].append(
            f'run {attempt} {r["outcome"]}: ' f'{_tail(log_path)}'
        )
        break
      if r['outcome'] == 'finished':
        break
      kills.append(
          dict(
              chain=index,
              mode=mode,
              at=at,
              killed_at=r['seconds'],
              last_event=r['last_event'],
              phase=phase_of(r['last_event']),
              recomputed_bytes=0,
              recomputed_files=[],
          )
      )
      watch = finished_work_files(chain_dir)
    differences = []
    if not chain['failures']:
      differences = same_outcome(reference, outcome_of(chain_dir))
    chain['identical'] = not chain['failures'] and not differences
    chain['differences'] = differences
    for k in kills:
      k['survived'] = chain['identical']
    out['kills'] += kills
    out['chains'].append(chain)
    results.write_json(path, summarize_counts(out))
  shutil.rmtree(chain_dir, ignore_errors=True)
  results.write_json(path, summarize_counts(out))
  finish(workdir)


def summarize_counts(out: dict[str, Any]) -> dict[str, Any]:
  """Adds the totals to `out` (kills tried, survived, bytes recomputed)."""
  kills = out['kills']
  for k in kills:  # from the recorded event, always
    k['phase'] = phase_of(k['last_event'])
  out['totals'] = dict(
      kills_tried=len(kills),
      kills_survived=sum(k['survived'] for k in kills),
      chains=len(out['chains']),
      chains_identical=sum(c['identical'] for c in out['chains']),
      recomputed_bytes=sum(k['recomputed_bytes'] for k in kills),
      by_mode={
          m: sum(k['mode'] == m for k in kills) for m in ('time', 'event')
      },
      by_phase={
          p: sum(k['phase'] == p for k in kills)
          for p in PHASE_ORDER
          if any(k['phase'] == p for k in kills)
      },
  )
  return out


def summarize(out: dict[str, Any]) -> str:
  t = out['totals']
  rows = [
      dict(
          phase=p,
          kills=n,
          survived=sum(k['survived'] for k in out['kills'] if k['phase'] == p),
      )
      for p, n in t['by_phase'].items()
  ]
  failed = [c for c in out['chains'] if not c['identical']]
  lines = [
      f"# Soak: {out['job']} SIGKILLed {t['kills_tried']} times",
      '',
      f"Kills survived: **{t['kills_survived']} / {t['kills_tried']}** "
      f"({t['by_mode']['time']} at a random time, {t['by_mode']['event']} "
      'at the first file event after a random time), in '
      f"{t['chains']} chains of runs; {t['chains_identical']} of "
      f"{t['chains']} chains ended with results identical to the reference "
      '(results.json without timings and resume flags, every factor bit '
      'for bit).',
      '',
      f"Finished work recomputed: {t['recomputed_bytes']:,} bytes (files of "
      'resumable work, progress/ and dense.json, complete and valid at a '
      'kill and written again later).',
      '',
      f"Reference run: {out['reference_seconds']:.1f} s, "
      f"{out['reference_events']} file events.",
      '',
      'What the kills hit (phase of the last file event before the kill):',
      '',
      results.markdown_table(rows, ['phase', 'kills', 'survived']),
  ]
  if failed:
    lines += ['Chains that did not end identical:', '']
    lines += [
        f"- chain {c['index']}: {'; '.join(c['failures'] + c['differences'])}"
        for c in failed
    ]
    lines.append('')
  return '\n'.join(lines)


def plot(workdir: str) -> None:
  """Kill moments by phase hit, survived or not, from results.json alone."""
  out = results.read_json(os.path.join(workdir, 'results.json'))
  kills = out['kills']
  phases = [p for p in PHASE_ORDER if any(k['phase'] == p for k in kills)]
  fig, (ax, bx) = plt.subplots(
      1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[3, 1])
  )
  for mode, marker in (('time', 'o'), ('event', '^')):
    for survived, color in ((True, 'tab:green'), (False, 'tab:red')):
      pts = [
          (k['killed_at'], phases.index(k['phase']))
          for k in kills
          if k['mode'] == mode and k['survived'] == survived
      ]
      if pts:
        ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=marker,
            color=color,
            alpha=0.7,
            label=f"{mode} kill, {'survived' if survived else 'lost'}",
        )
  ax.axvline(out['reference_seconds'], color='gray', ls=':', lw=1)
  ax.set_yticks(range(len(phases)), phases, fontsize=8)
  ax.set_xlabel('seconds after launch when SIGKILLed (dotted: a whole run)')
  ax.set_title(
      f"{out['totals']['kills_survived']} / "
      f"{out['totals']['kills_tried']} kills survived, "
      f"{out['totals']['recomputed_bytes']:,} bytes recomputed",
      fontsize=10,
  )
  ax.legend(fontsize=7, loc='lower right')
  counts = [sum(k['phase'] == p for k in kills) for p in phases]
  bx.barh(range(len(phases)), counts, color='tab:blue')
  bx.set_yticks(range(len(phases)), [''] * len(phases))
  bx.set_xlabel('kills')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'soak.png'), dpi=120)
  plt.close(fig)


def finish(workdir: str) -> None:
  out = results.read_json(os.path.join(workdir, 'results.json'))
  summary = summarize(out)
  results.write_text(os.path.join(workdir, 'summary.md'), summary)
  plot(workdir)
  print(summary)
