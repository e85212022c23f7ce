"""ClusterExecutor.map's chunksize grouping for elementwise tasks: inputs are concatenated into
one job and its answer is cut back into one result per input, in order."""

from __future__ import annotations

from clusterd.client.executor import _group, _ungroup


def test_group_concatenates_list_inputs_with_their_lengths():
    """Up to `size` consecutive list inputs become one job input; lengths cut it back."""
    units = list(_group([[1, 2], [3], [], [4, 5, 6], [7]], 2))
    assert units == [([1, 2, 3], [2, 1]), ([4, 5, 6], [0, 3]), ([7], [1])]


def test_group_sends_a_non_list_input_alone():
    """An input that is not a list cannot be concatenated: it is its own job, order kept."""
    units = list(_group([[1], 5, [2], [3]], 3))
    assert units == [([1], [1]), (5, None), ([2], [1]), ([3], [1])]


def test_ungroup_cuts_answers_back_in_input_order():
    """Each grouped answer is sliced by the inputs' lengths; lone answers pass through."""
    results = iter([[1, 4, 9], "five", [16]])
    assert list(_ungroup(results, [[2, 1], None, [1]])) == [[1, 4], [9], "five", [16]]
