"""The price reader a run and the report share: inline or file tables, and errors that say what is wrong."""

import json

import pytest

from blueberry import hardware
from blueberry.prices import read_price, read_price_table


def test_a_table_is_read_inline_or_from_a_file(tmp_path):
    assert read_price_table('{"T4": 0.2, "H100": 3}', "SRC") == {"T4": 0.2, "H100": 3.0}
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"RTX 4090": 0.18}))
    assert read_price_table(str(table), "SRC") == {"RTX 4090": 0.18}
    assert read_price("0.4", "SRC") == 0.4 and read_price("0", "SRC") == 0.0


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("/no/such/prices.json", "'/no/such/prices.json' is neither a JSON object nor a file"),
        ("{bad", "SRC: not valid JSON"),
        ('{"T4": -1}', "prices must be finite numbers ≥ 0 (USD per hour), got {'T4': -1}"),
        ('{"T4": NaN, "A100": 1}', "got {'T4': nan}"),
        ('{"T4": true}', "got {'T4': True}"),
        ('{"T4": "0.3"}', "got {'T4': '0.3'}"),
        ('{"T4": 0.3, "T4": 0.2}', "SRC: key 'T4' appears twice"),  # the last won, silently
        ('{"H100": 2, "h100": 3}', "SRC: key 'h100' appears twice (names match whatever their case)"),
        ('{"": 3, "": 2}', "SRC: key '' appears twice"),
    ],
)
def test_a_wrong_table_names_its_source_and_the_problem(raw, says):
    with pytest.raises(ValueError, match="^SRC") as error:
        read_price_table(raw, "SRC")
    assert says in str(error.value)


def test_a_table_file_that_is_wrong_is_named_in_the_error(tmp_path):
    (tmp_path / "list.json").write_text("[0.2]")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"SRC \(.*list\.json\): expected a JSON object .*, got list"):
        read_price_table(str(tmp_path / "list.json"), "SRC")
    with pytest.raises(ValueError, match=r"SRC \(.*broken\.json\): not valid JSON"):
        read_price_table(str(tmp_path / "broken.json"), "SRC")
    with pytest.raises(ValueError, match="neither a JSON object nor a file"):
        read_price_table(str(tmp_path), "SRC")  # a directory


@pytest.mark.parametrize("raw", ["abc", "-0.5", "nan", "inf"])
def test_a_wrong_price_is_refused(raw):
    with pytest.raises(ValueError, match=f"^SRC='{raw}'"):
        read_price(raw, "SRC")


def test_a_run_refuses_the_tables_the_report_refuses(monkeypatch, tmp_path):
    t4 = hardware.preset_for("Tesla T4")
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", '{"T4": -0.2}')
    with pytest.raises(ValueError, match="BLUEBERRY_GPU_PRICES: prices must be finite numbers ≥ 0"):
        hardware.price_per_hour(None, t4)
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"t4": 0.25}))  # a run matches its preset's name in any case
    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", str(table))
    assert hardware.price_per_hour(None, t4) == (0.25, "BLUEBERRY_GPU_PRICES (t4)")
    monkeypatch.setenv("BLUEBERRY_PRICE_PER_HOUR", "-1")
    with pytest.raises(ValueError, match="BLUEBERRY_PRICE_PER_HOUR='-1': a price must be"):
        hardware.price_per_hour(None, hardware.CPU_PRESET)


# A run prices its GPU as the report does, from the one lookup (prices.table_price): (GPU, table, $/h)
SAME_PRICE = [
    ("NVIDIA H100 NVL", {"H100": 2.0}, 2.0),  # a run took the list price: its preset is "H100 NVL"
    ("NVIDIA H100 NVL", {"H100": 2.0, "H100 NVL": 2.5}, 2.5),  # the longest row whose words are all in the name
    ("NVIDIA GeForce RTX 4090", {"NVIDIA GeForce RTX 4090": 0.18}, 0.18),  # a row as NVML names the GPU
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", {"A100": 1.4, "A100 MIG 3g.40gb": 0.5}, 0.5),  # the slice's own row wins
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", {"A100": 1.4}, 0.6),  # else the board's, times 3/7
    # a compute instance of that slice is 1/7 of the board, not the 3g slice's price
    ("NVIDIA A100-SXM4-80GB MIG 1c.3g.40gb", {"A100": 1.4, "A100 MIG 3g.40gb": 0.6}, 0.2),
    ("NVIDIA A30 MIG 1g.6gb", {"A30": 0.6}, 0.15),  # no preset for the A30, but its slices are quarters
    ("NVIDIA L4", {"L4": 0.7}, 0.7),  # a GPU without a preset, priced by the table
    ("NVIDIA RTX A1000 6GB Laptop GPU", {"A100": 1.5}, None),  # "A100" is not a word of "A1000"
    ("NVIDIA T400 4GB", {"T4": 0.35}, None),
]


@pytest.mark.parametrize(("gpu", "table", "price"), SAME_PRICE)
def test_a_run_and_the_report_price_a_gpu_from_a_table_alike(gpu, table, price, monkeypatch):
    from blueberry.report.integrity import _table_price

    monkeypatch.setenv("BLUEBERRY_GPU_PRICES", json.dumps(table))
    run_price, _ = hardware.price_per_hour(None, hardware.preset_for(gpu))
    if price is None:  # no row: the run falls back to its preset's list price, which such a GPU has none of
        assert _table_price(gpu, table) is None and run_price is None
    else:
        assert run_price == pytest.approx(price) and _table_price(gpu, table) == pytest.approx(price)


def test_a_preset_matches_whole_words_of_the_gpus_name():
    assert hardware.preset_for("NVIDIA A100-SXM4-80GB").name == "A100"
    assert hardware.preset_for("Tesla T4").name == "T4"
    assert hardware.preset_for("NVIDIA RTX A1000").peak_tflops == {}  # was the A100's 312 TFLOP/s
    assert hardware.preset_for("NVIDIA T400 4GB").peak_tflops == {}  # was the T4's
    assert hardware.preset_for("NVIDIA GH200 480GB").name == "GH200"  # its Hopper GPU (was: H200 by accident)
    assert hardware.preset_for("NVIDIA H200 NVL").name == "H200 NVL"
