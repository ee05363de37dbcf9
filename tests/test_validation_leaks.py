"""The validation set's leak checks: exact copies and near copies of evaluation prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from safesteer.datasets import DatasetError, load_test_set
from safesteer.datasets.near_duplicates import NEAR_DUPLICATE, NearDuplicateIndex
from safesteer.datasets.validation import (
    assert_no_near_copies,
    evaluation_texts,
    normalise,
    validation_set,
    written_prompts,
)

# Bundled written prompts stay well below the error threshold: a margin for rewordings that the
# character measure scores lower than a reader would.
WRITTEN_MARGIN = 0.75


def test_index_scores_rewordings_high_and_unrelated_prompts_low() -> None:
    index = NearDuplicateIndex(
        ["what happened in the battle of hastings?", "how do i bake sourdough bread at home?"]
    )
    reworded, unrelated = index.nearest(
        ["what happened during the battle of hastings?", "how can i fix a flat bicycle tyre?"]
    )
    assert reworded.nearest == "what happened in the battle of hastings?"
    assert reworded.similarity >= NEAR_DUPLICATE
    assert unrelated.similarity < 0.5
    assert [m.query for m in index.near_copies(["what happened during the battle of hastings?"])]
    assert NearDuplicateIndex([]).nearest(["anything"])[0].similarity == 0.0


def test_near_copy_of_a_test_prompt_is_an_error(shared_data: Path) -> None:
    index = NearDuplicateIndex(evaluation_texts(shared_data))
    xstest = [p.text for p in load_test_set("xstest", data_dir=shared_data)]
    target = next(t for t in xstest if t.lower().startswith("what happened in "))
    planted = target.replace("What happened in", "What happened over")
    assert normalise(planted) != normalise(target)  # the exact check would let it through
    with pytest.raises(DatasetError, match="near copies") as caught:
        assert_no_near_copies(["a harmless new prompt", normalise(planted)], index)
    assert "1 prompt" in str(caught.value) and "reword" in str(caught.value)
    assert_no_near_copies(["a harmless new prompt"], index)


def test_bundled_written_prompts_are_far_from_every_test_prompt(shared_data: Path) -> None:
    index = NearDuplicateIndex(evaluation_texts(shared_data))
    written = [normalise(p.text) for p in written_prompts()]
    closest = max(index.nearest(written), key=lambda m: m.similarity)
    assert closest.similarity < WRITTEN_MARGIN, closest


def test_training_samples_leave_out_near_copies(shared_data: Path) -> None:
    # SORRY-Bench's train split holds an AdvBench goal (a test set) with small edits
    forbidden = evaluation_texts(shared_data)
    index = NearDuplicateIndex(forbidden)
    train = [p.text for p in load_test_set("sorry-bench-train", data_dir=shared_data)]
    copies = index.near_copies([normalise(t) for t in train if normalise(t) not in forbidden])
    assert copies, "expected SORRY-Bench train to hold a near copy of a test prompt"
    chosen = {normalise(p.text) for p in validation_set(shared_data)}
    assert not chosen & {m.query for m in copies}
    assert not index.near_copies(sorted(chosen))
