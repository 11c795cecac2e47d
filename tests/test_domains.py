"""Tests of kdkit.domains.create_domain_mask."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdkit import create_domain_mask


@pytest.mark.parametrize(
    "domain",
    [[0, 1, 2, 0], torch.tensor([0, 1, 2, 0]), np.array([0, 1, 2, 0]), (0, 1, 2, 0)],
    ids=["list", "tensor", "numpy", "tuple"],
)
def test_containers(domain):
    source, target = create_domain_mask({"domain": domain})
    assert source.dtype == torch.bool and source.shape == (4,)
    assert source.tolist() == [True, False, False, True]
    assert target.tolist() == [False, True, True, False]


def test_collection_of_sources():
    source, target = create_domain_mask(
        {"domain": torch.tensor([0, 1, 2, 3])}, source_domain=[1, 3]
    )
    assert source.tolist() == [False, True, False, True]
    assert target.tolist() == [True, False, True, False]


def test_empty_batch():
    source, target = create_domain_mask({"domain": torch.zeros(0, dtype=torch.long)})
    assert source.shape == target.shape == (0,)


@given(st.lists(st.integers(0, 5), max_size=20), st.sets(st.integers(0, 5), min_size=1))
def test_partition(domains, sources):
    source, target = create_domain_mask({"domain": domains}, source_domain=sources)
    assert (source ^ target).all()
    assert source.tolist() == [d in sources for d in domains]


def test_errors():
    with pytest.raises(KeyError, match="must contain a 'domain' entry"):
        create_domain_mask({"features": torch.zeros(2)})
    with pytest.raises(TypeError, match="integer domain ids"):
        create_domain_mask({"domain": torch.tensor([0.0, 1.0])})
    with pytest.raises(TypeError, match="integer domain ids"):
        create_domain_mask({"domain": [0, 1.5]})
    with pytest.raises(TypeError, match="integer domain ids"):
        create_domain_mask({"domain": np.array([0.0, 1.0])})
    with pytest.raises(TypeError, match="integer domain ids"):
        create_domain_mask({"domain": [True, False]})
    with pytest.raises(TypeError, match="dict-like batch"):
        create_domain_mask(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        create_domain_mask({"domain": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match="source_domain must"):
        create_domain_mask({"domain": [0, 1]}, source_domain="0")
    with pytest.raises(TypeError, match="source_domain must hold integers"):
        create_domain_mask({"domain": [0, 1]}, source_domain=[0.5])
    with pytest.raises(ValueError, match="at least one domain id"):
        create_domain_mask({"domain": [0, 1]}, source_domain=[])
