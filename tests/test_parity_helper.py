"""`close`, the comparison of every parity test (tests/parity.py), fails where it should and says where."""
import pytest
import torch

from parity import close, max_abs_diff


def test_passes_within_tolerance():
    close('x', torch.tensor([1.0, 2.0]), torch.tensor([1.0 + 5e-5, 2.0]), atol=1e-4)
    close('x', torch.tensor([100.0]), torch.tensor([100.05]), atol=0.0, rtol=1e-3)     # relative to |ref|
    close('g', torch.tensor([1e-3, 10.0]), torch.tensor([0.0, 10.0]), atol=0.0, max_rtol=1e-3 * 1.01)  # to max|ref|
    close('float32 vs float64', torch.tensor([0.1]), torch.tensor([0.1], dtype=torch.float64), atol=1e-7)
    close('empty', torch.zeros(0, 4), torch.zeros(0, 4))
    close('nan', torch.tensor([float('nan'), 1.0]), torch.tensor([float('nan'), 1.0]), equal_nan=True)
    close('number', 0.5, torch.tensor(0.5))


def test_fails_with_name_place_and_values():
    with pytest.raises(AssertionError, match=r"pred_boxes: 1 of 6 elements off, max \|ours - ref\| = 0\.01 at \[1, 0\] "
                                             r"\(ours 0\.51, reference 0\.5\)"):
        close('pred_boxes', torch.tensor([[0.5, 0.5, 0.5], [0.51, 0.5, 0.5]]), torch.full((2, 3), 0.5), atol=1e-4)
    with pytest.raises(AssertionError, match='x: shape'):
        close('x', torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(AssertionError, match='1 of 2'):
        close('nan', torch.tensor([float('nan'), 1.0]), torch.tensor([0.0, 1.0]), atol=1.0)   # NaN is never close
    with pytest.raises(AssertionError, match='1 of 2'):
        close('nan', torch.tensor([float('nan'), 1.0]), torch.tensor([float('nan'), 1.0]))    # unless equal_nan


def test_integers_must_be_equal():
    close('indices', torch.tensor([3, 1]), torch.tensor([3, 1]))
    with pytest.raises(AssertionError, match=r'indices: 1 of 2 elements differ .* first at \[1\]: 2 != reference 1'):
        close('indices', torch.tensor([3, 2]), torch.tensor([3, 1]), atol=10)
    with pytest.raises(AssertionError, match='dtype torch.int32 != reference torch.int64'):
        close('indices', torch.tensor([3, 1], dtype=torch.int32), torch.tensor([3, 1]))


def test_dicts_and_sequences_name_the_key():
    ref = {'loss_ce': torch.tensor(1.0), 'aux': [(torch.tensor([0]), torch.tensor([1.0]))]}
    close('losses', {'loss_ce': torch.tensor(1.0), 'aux': [(torch.tensor([0]), torch.tensor([1.0]))]}, ref)
    with pytest.raises(AssertionError, match=r"losses\['aux'\]\[0\]\[1\]: 1 of 1 elements off"):
        close('losses', {'loss_ce': torch.tensor(1.0), 'aux': [(torch.tensor([0]), torch.tensor([1.5]))]}, ref)
    with pytest.raises(AssertionError, match='keys'):
        close('losses', {'aux': ref['aux'], 'loss_ce': torch.tensor(1.0)}, ref)   # order matters (the total sums in it)
    with pytest.raises(AssertionError, match='1 items, the reference has 2'):
        close('aux_outputs', [torch.zeros(1)], [torch.zeros(1)] * 2)


def test_max_abs_diff():
    assert max_abs_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) == 0.5
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0
