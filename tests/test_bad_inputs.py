"""Every bad input in tests/bad_inputs.py gets its clear ValueError; docs/bad-inputs.md is that list."""

import re

import pytest

from tests.bad_inputs import CASES, DOC, render


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.what}" for c in CASES])
def test_bad_input_gets_a_clear_error(case, tmp_path):
    with pytest.raises(ValueError) as info:
        case.run(str(tmp_path))
    assert re.search(case.match, str(info.value)), (
        f"{case.what}: the message\n  {info.value}\ndoes not match\n  {case.match}")


def test_the_docs_table_is_the_case_list():
    with open(DOC) as f:
        assert f.read() == render(), "docs/bad-inputs.md is stale: run python tests/bad_inputs.py"
