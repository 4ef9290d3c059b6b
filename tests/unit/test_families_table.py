"""One table of families: every module's rules come from ``models.families`` and agree with the tiny models."""

from __future__ import annotations

import pytest

from mmalign.models import tiny
from mmalign.models.families import FAMILIES, TINY_FAMILIES
from mmalign.models.image_tokens import image_token_id
from mmalign.models.shared_prefix import family_rules


def test_tiny_builders_are_the_tiny_rows_of_the_table():
    assert set(tiny._BUILDERS) == set(TINY_FAMILIES) == set(tiny.FAMILIES)
    assert len(TINY_FAMILIES) == 6


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_reads_its_rules_from_the_table(family):
    model, tokenizer = tiny.build_tiny_model(family)
    assert model.config.model_type == family
    # The config field the table names holds the tokenizer's image placeholder.
    assert tokenizer.convert_ids_to_tokens(image_token_id(model.config)) == tokenizer.image_token
    assert family_rules(model.config) is FAMILIES[family]


def test_shared_prefix_refuses_a_family_whose_row_has_no_rules():
    model, _ = tiny.build_tiny_model("llava")
    model.config.model_type = "llava_onevision"  # in the table for image tokens only
    assert image_token_id(model.config) == model.config.image_token_index
    with pytest.raises(ValueError, match="'llava_onevision' is not supported.*use forward: plain"):
        family_rules(model.config)
