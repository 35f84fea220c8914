"""benchmarks.timeline: the per-step breakdown of a Horovod timeline, on hand-made timelines whose
answers are known (rank 0's view: NEGOTIATE_ALLREDUCE then ALLREDUCE per tensor and step)."""
import json

import pytest

from benchmarks import timeline as T


def _tensor(pid, name):
    return [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]


def _span(pid, name, b_ms, e_ms):
    return [{"ph": "B", "name": name, "ts": int(b_ms * 1000), "pid": pid},
            {"ph": "E", "ts": int(e_ms * 1000), "pid": pid}]


def _step(t0):
    """Two gradients. A: first rank ready at t0+0, last at t0+100, reduced t0+110..t0+130.
    B (the last one): first rank ready at t0+200, last at t0+450 (skew 250), reduced t0+460..t0+500."""
    return (_span(1, T.NEGOTIATE, t0, t0 + 100) + _span(1, T.REDUCE, t0 + 110, t0 + 130)
            + _span(2, T.NEGOTIATE, t0 + 200, t0 + 450) + _span(2, T.REDUCE, t0 + 460, t0 + 500))


def _write(path, events, terminated=True):
    text = "[\n" + ",\n".join(json.dumps(e) for e in events) + (",\n]" if terminated else ",\n")
    path.write_text(text)
    return path


def test_step_breakdown_known_numbers(tmp_path):
    events = _tensor(1, "grad_a") + _tensor(2, "grad_b") + _step(0) + _step(1000) + _step(2000)
    steps = T.step_breakdown(T.load_events(_write(tmp_path / "t.json", events)))
    assert len(steps) == 3
    for s in steps:
        assert s["tensors"] == 2
        assert s["skew_ms"] == pytest.approx(250)  # the last gradient: 200 -> 450
        assert s["backward_ms"] == pytest.approx(450)  # first ready 0, all ready 450
        assert s["allreduce_ms"] == pytest.approx(20 + 40)  # two disjoint reductions
        assert s["exposed_ms"] == pytest.approx(50)  # all ready 450, last reduction done 500


def test_overlapping_reductions_counted_once_and_unterminated_file(tmp_path):
    # Horovod writes as it goes: a killed run leaves no closing bracket; fused tensors share a span.
    events = (_tensor(1, "a") + _tensor(2, "b") + _span(1, T.NEGOTIATE, 0, 10) + _span(2, T.NEGOTIATE, 0, 10)
              + _span(1, T.REDUCE, 20, 60) + _span(2, T.REDUCE, 30, 70))
    s = T.step_breakdown(T.load_events(_write(tmp_path / "t.json", events, terminated=False)))
    assert len(s) == 1 and s[0]["allreduce_ms"] == pytest.approx(50)  # union of 20-60 and 30-70
    assert s[0]["exposed_ms"] == pytest.approx(60) and s[0]["skew_ms"] == pytest.approx(10)


def test_summarize_skips_warmup_steps(tmp_path):
    slow_first = _span(1, T.NEGOTIATE, 0, 900) + _span(1, T.REDUCE, 900, 1000)  # tracing step: skew 900
    events = _tensor(1, "a") + slow_first
    for t0 in (2000, 3000, 4000):
        events += _span(1, T.NEGOTIATE, t0, t0 + 100) + _span(1, T.REDUCE, t0 + 100, t0 + 120)
    f = _write(tmp_path / "t.json", events)
    s = T.summarize(f, skip=1)
    assert s["steps"] == 4 and s["steps_used"] == 3 and s["skew_ms"] == pytest.approx(100)
    assert T.summarize(f, skip=0)["skew_ms"] == pytest.approx(100)  # median of 900, 100, 100, 100
    assert T.summarize(f, skip=10)["steps_used"] == 4  # skipping everything falls back to all steps


def test_bad_files_and_cli(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty timeline"):
        T.load_events(empty)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(ValueError, match="not a Horovod timeline"):
        T.load_events(junk)
    good = _write(tmp_path / "good.json", _tensor(1, "a") + _tensor(2, "b") + _step(0) + _step(1000))
    assert T.main([str(good), "--skip", "0"]) == 0
    out = capsys.readouterr().out
    assert "| good.json (2 of 2 steps, 2 tensors) | 250 | 450 | 60 | 50 | - |" in out
    assert T.main([str(good), str(junk)]) == 2  # the good file is still reported
    cap = capsys.readouterr()
    assert "good.json" in cap.out and "junk.json" in cap.err
    gather_only = _write(tmp_path / "gather.json", _tensor(1, "g") + _span(1, "NEGOTIATE_ALLGATHER", 0, 5)
                         + _span(1, "ALLGATHER", 5, 6))
    assert T.main([str(gather_only)]) == 2
    assert "no allreduce in the timeline" in capsys.readouterr().err


def test_markdown_row_share_of_step():
    row = T.markdown_row("x", {"skew_ms": 450.0, "backward_ms": 3000.0, "allreduce_ms": 90.0, "exposed_ms": 50.0},
                         step_s=10.0)
    assert row == "| x | 450 | 3,000 | 90 | 50 | 5.0% |"


def test_subcommand_of_cxr_bench(tmp_path, capsys):
    from benchmarks.__main__ import main as bench_main

    good = _write(tmp_path / "good.json", _tensor(1, "a") + _tensor(2, "b") + _step(0) + _step(1000))
    assert bench_main(["timeline", str(good), "--skip", "0", "--steps"]) == 0
    out = capsys.readouterr().out
    assert "| good.json (2 of 2 steps, 2 tensors) | 250 |" in out and "|   step 1 | 250 |" in out
    with pytest.raises(SystemExit) as e:  # options before the files reach the subcommand
        bench_main(["timeline", "--help"])
    assert e.value.code == 0 and "--skip" in capsys.readouterr().out
