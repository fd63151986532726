"""FactoredMatrix agrees with the dense product it stands for (float64, 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusionlens.weights.factored_matrix import FactoredMatrix

TOL = dict(atol=1e-10, rtol=1e-10)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


@pytest.fixture
def fm() -> FactoredMatrix:
    """Three heads of a rank-4 map from 7 to 6 dimensions."""
    return FactoredMatrix(randn(3, 7, 4, seed=0), randn(3, 4, 6, seed=1))


def test_shape_and_products(fm):
    assert fm.shape == (3, 7, 6) and (fm.ldim, fm.mdim, fm.rdim) == (7, 4, 6) and fm.ndim == 3
    close(fm.AB, fm.A @ fm.B)
    close(fm.T.AB, fm.AB.transpose(-2, -1))
    assert fm.T.shape == (3, 6, 7)
    close(fm[1].AB, fm.AB[1])
    close(fm[1:].AB, fm.AB[1:])
    close(fm.get_corner(2), fm.AB[..., :2, :2])
    close((2.5 * fm).AB, 2.5 * fm.AB)


def test_broadcasts_leading_dims():
    shared_B = randn(4, 5, seed=2)
    fm = FactoredMatrix(randn(3, 6, 4, seed=3), shared_B)
    assert fm.shape == (3, 6, 5)
    close(fm.AB, fm.A @ shared_B)


@pytest.mark.parametrize("shape", [(3, 7, 4, 6), (3, 3, 5, 8), (2, 9, 2, 2)])
def test_svd_matches_dense(shape):
    heads, ldim, mdim, rdim = shape
    fm = FactoredMatrix(randn(heads, ldim, mdim, seed=4), randn(heads, mdim, rdim, seed=5))
    U, S, V = fm.svd()  # TransformerLens's convention: U diag(S) Vᵀ
    k = min(ldim, mdim, rdim)
    assert U.shape == (heads, ldim, k) and S.shape == (heads, k) and V.shape == (heads, rdim, k)
    close(U @ torch.diag_embed(S) @ V.mT, fm.AB)
    close(S, torch.linalg.svdvals(fm.AB)[..., :k])
    eye = torch.eye(k, dtype=torch.float64).expand(heads, k, k)
    close(U.transpose(-2, -1) @ U, eye)
    close(V.mT @ V, eye)
    close(fm.U, U)
    close(fm.S, S)
    close(fm.V, V)
    with pytest.raises(AttributeError, match=r"use fm\.V .* or fm\.V\.mT"):
        _ = fm.Vh
    close(fm.norm(), torch.linalg.matrix_norm(fm.AB))
    close(fm.collapse_r() @ V.mT, fm.AB)
    close(U @ fm.collapse_l(), fm.AB)
    even = fm.make_even()
    close(even.AB, fm.AB)
    close(even.A.mT @ even.A, even.B @ even.B.mT)  # each factor carries half of every singular value


def test_eigenvalues_are_the_nonzero_eigenvalues_of_AB():
    fm = FactoredMatrix(randn(2, 6, 3, seed=6), randn(2, 3, 6, seed=7))
    close(fm.BA, fm.B @ fm.A)
    eig = fm.eigenvalues
    assert eig.shape == (2, 3) and eig.is_complex()
    dense = torch.linalg.eigvals(fm.AB)
    for h in range(2):
        # AB (6×6, rank 3) has BA's 3 eigenvalues plus 3 zeros.
        top = dense[h][dense[h].abs().argsort(descending=True)[:3]]
        np.testing.assert_allclose(np.sort_complex(top.numpy()), np.sort_complex(eig[h].numpy()), atol=1e-10)
    close(eig.sum(-1).real, torch.diagonal(fm.AB, dim1=-2, dim2=-1).sum(-1))


def test_matmul_with_tensors_and_factored_matrices(fm):
    right, left = randn(6, 5, seed=8), randn(2, 7, seed=10)
    vec_r, vec_l = randn(6, seed=11), randn(7, seed=12)
    out = fm @ right
    assert isinstance(out, FactoredMatrix) and out.mdim == 4  # A (B right): mdim 4 < rdim 6
    close(out.AB, fm.AB @ right)
    out = left @ fm
    assert isinstance(out, FactoredMatrix) and out.mdim == 4
    close(out.AB, left @ fm.AB)
    wide = FactoredMatrix(randn(3, 5, seed=16), randn(5, 2, seed=17))  # mdim 5 > ldim 3, rdim 2
    out = wide @ randn(2, 4, seed=18)
    assert out.mdim == 2
    close(out.AB, wide.AB @ randn(2, 4, seed=18))
    out = randn(4, 3, seed=19) @ wide
    assert out.mdim == 3
    close(out.AB, randn(4, 3, seed=19) @ wide.AB)
    close(fm @ vec_r, fm.AB @ vec_r)
    close(vec_l @ fm, vec_l @ fm.AB)
    other = FactoredMatrix(randn(3, 6, 2, seed=13), randn(3, 2, 5, seed=14))
    product = fm @ other
    assert isinstance(product, FactoredMatrix) and product.shape == (3, 7, 5) and product.mdim == 2
    close(product.AB, fm.AB @ other.AB)
    # Associativity, mixing tensors and factored matrices.
    close(((left @ fm) @ other).AB, (left @ (fm @ other)).AB)
    close(((fm @ other) @ randn(5, 3, seed=15)).AB, (fm @ (other @ randn(5, 3, seed=15))).AB)


def test_shape_errors_are_clear(fm):
    with pytest.raises(ValueError, match=r"A's last dimension \(4\) must equal B's second-to-last \(5\)"):
        FactoredMatrix(randn(7, 4, seed=0), randn(5, 6, seed=1))
    with pytest.raises(ValueError, match="at least 2-D"):
        FactoredMatrix(randn(4, seed=0), randn(4, 6, seed=1))
    with pytest.raises(ValueError, match="leading .* do not broadcast"):
        FactoredMatrix(randn(3, 7, 4, seed=0), randn(2, 4, 6, seed=1))
    with pytest.raises(ValueError, match=r"rdim is 6 but the other operand's matching dimension is 5"):
        fm @ randn(5, 2, seed=2)
    with pytest.raises(ValueError, match=r"ldim is 7 but the other operand's matching dimension is 6"):
        randn(2, 6, seed=2) @ fm
    with pytest.raises(ValueError, match="rdim is 6"):
        fm @ FactoredMatrix(randn(7, 2, seed=3), randn(2, 3, seed=4))
    with pytest.raises(ValueError, match=r"BA needs a square product"):
        _ = fm.BA
    with pytest.raises(IndexError, match=r"4 indices for a FactoredMatrix of shape \(3, 7, 6\): at most 3"):
        _ = fm[0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"needs a scalar.*shape \(3,\); for a matrix product use @"):
        _ = fm * torch.ones(3)


def test_indexing_reaches_the_matrix_dimensions(fm):
    """As TransformerLens: past the leading dimensions an index picks rows, then columns; an int keeps the axis."""
    close(fm[1, 2].AB, fm.AB[1, 2:3])
    close(fm[1, -1, [0, 5]].AB, fm.AB[1, -1:, [0, 5]])
    close(fm[:, 1:4, -1].AB, fm.AB[:, 1:4, -1:])
    assert fm[0].shape == (7, 6) and fm.has_leading_dims and not fm[0].has_leading_dims


def test_scalar_multiplication_keeps_the_shape(fm):
    for scalar in (2.5, 3, torch.tensor(0.5), torch.rand(1)):
        assert (fm * scalar).shape == fm.shape and (scalar * fm).shape == fm.shape
        close((fm * scalar).AB, fm.AB * scalar)
    assert fm.pair == (fm.A, fm.B) and fm.unsqueeze(0).shape == (1, *fm.shape)


def test_bf16_eigenvalues_are_computed_in_float32():
    fm = FactoredMatrix(randn(4, 2, seed=20).bfloat16(), randn(2, 4, seed=21).bfloat16())
    assert fm.eigenvalues.dtype == torch.complex64
