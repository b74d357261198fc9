"""The synthetic generator and its Bayes-optimal bound (:func:`raysrec.data.synth.oracle_ndcg`)."""

import pandas as pd
import pytest

from raysrec.data.synth import SynthConfig, generate, oracle_ndcg, simulate


def test_generate_is_seeded_and_equals_the_simulation():
    cfg = SynthConfig(num_users=200, num_items=150, num_events=6000, seed=4)
    a, items = generate(cfg)
    sim = simulate(cfg)
    assert a.equals(sim.interactions) and items.equals(sim.items)
    assert not a.equals(generate(cfg.replace(seed=5))[0])
    per_user = a.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing)
    assert per_user.all()


def test_oracle_predicts_pure_walks_exactly():
    # Sessions never end, nobody strays: every event after a user's first walks the category order.
    cfg = SynthConfig(num_users=100, num_items=120, num_events=3000, mean_session_length=1e9,
                      p_follow=1.0, p_off_session=0.0, seed=1)
    result = oracle_ndcg(cfg, simulate(cfg))
    assert result["session_start_share"] == 0.0
    assert result["expected"] == pytest.approx(1.0) and result["sampled"] == pytest.approx(1.0)


def test_oracle_agrees_with_the_drawn_targets_and_knowing_the_gap_never_hurts():
    cfg = SynthConfig(num_users=1200, seed=0)
    sim = simulate(cfg)
    gap, blind = oracle_ndcg(cfg, sim), oracle_ndcg(cfg, sim, knows_gap=False)
    # The oracle's expectation matches what the generator actually drew (1,200 targets: sd ~0.012).
    assert abs(gap["sampled"] - gap["expected"]) < 0.04
    assert abs(blind["sampled"] - blind["expected"]) < 0.04
    # Knowing the gap helps where a session starts; inside a session both know the same.
    assert gap["expected"] > blind["expected"]
    assert gap["expected_session_start"] > blind["expected_session_start"] + 0.1
    assert gap["expected_within_session"] == pytest.approx(blind["expected_within_session"], abs=0.02)


def test_a_long_log_is_written_in_pieces_of_whole_users_with_the_same_shape(tmp_path):
    """Load-test logs are generated in pieces (bounded memory); one piece is generate()'s log exactly."""
    from raysrec.data.synth import generate_chunks, write

    cfg = SynthConfig(num_users=300, num_items=200, num_events=20_000, seed=4)
    whole, _ = generate(cfg)
    _, one = generate_chunks(cfg)
    assert pd.concat(list(one)).reset_index(drop=True).equals(whole)
    _, pieces = generate_chunks(cfg, max_events=3_000)
    pieces = list(pieces)
    assert len(pieces) >= 6 and all(len(p) <= 3_000 for p in pieces)
    log = pd.concat(pieces)
    assert len(log) == 20_000 and log["user_id"].is_monotonic_increasing
    assert log.groupby("user_id").size().equals(whole.groupby("user_id").size())   # same users, same activity
    assert log["item_id"].between(1, 200).all()
    write(cfg.replace(output=str(tmp_path / "log")))
    assert pd.read_parquet(tmp_path / "log" / "interactions.parquet").equals(whole)
