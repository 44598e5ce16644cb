"""tools/image_requirements.py: on an NGC image only missing packages are installed, the
image's own versions stay, megatron-core/transformers must match exactly, and TE's version is
checked against the range megatron-core declares."""

import pytest
from packaging.requirements import Requirement

import image_requirements


def test_plan_installs_only_what_the_image_lacks(tmp_path):
    tool = image_requirements
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# comment\ntorch==2.13.0\nmegatron-core==0.16.1\nPillow==13.0.0\n"
        "tokenizers==0.23.3\nnvidia-dali-cuda130==2.4.0\npyyaml==6.0.3  # pinned\n"
    )
    image = {
        "torch": "2.9.0a0+nv25.10",
        "Pillow": "11.3.0",
        "pyyaml": "6.0.3",
        "nvidia-dali-cuda130": "1.51.0",
    }
    result = tool.plan(tool.read_pins(str(req)), image.get)
    assert result.install == ["megatron-core==0.16.1", "tokenizers==0.23.3"]
    assert not result.errors
    assert any("Pillow: the image's 11.3.0 kept (requirements.txt: 13.0.0)" in k for k in result.kept)
    assert sum("stays" in k for k in result.kept) == 2  # torch, DALI


def test_plan_refuses_other_versions_of_exact_packages():
    tool = image_requirements
    result = tool.plan(
        [("transformers", "5.23.0"), ("megatron-core", "0.16.1")],
        {"transformers": "4.57.1", "megatron-core": "0.16.1"}.get,
    )
    assert result.install == [] and len(result.errors) == 1
    assert "transformers: the image has 4.57.1, the code needs exactly 5.23.0" in result.errors[0]


def test_bad_requirement_line_names_the_file(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("torch>=2\n")
    with pytest.raises(ValueError, match=r"r.txt:1: expected name==version"):
        image_requirements.read_pins(str(req))


def test_te_range_check():
    tool = image_requirements
    req = Requirement("transformer-engine[pytorch]<2.12.0,>=2.9.0a0; extra == 'dev'")
    assert tool.check_te("2.10.0+4a0b1c2", req)[0]
    ok, reason = tool.check_te("2.8.0", req)
    assert not ok and "OUTSIDE" in reason and "<2.12.0" in reason
    assert not tool.check_te(None, req)[0]
    # The installed megatron-core declares a TE range (read from its metadata).
    assert tool.te_requirement() is not None
