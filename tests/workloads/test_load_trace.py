"""load_trace (format auto / kvtwin / azure), trace_source, preset YAMLs, the CLI's one-line
errors."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from workloads.cli import main
from workloads.errors import SpecError, TraceError
from workloads.load import load_trace, trace_source
from workloads.presets import PRESETS, make_preset
from workloads.trace_io import write_trace

REPO = Path(__file__).resolve().parents[2]
WORKLOAD_CONF = REPO / "conf" / "workload"
AZURE_ROWS = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.5,40,3\n"
              "2023-11-16 18:00:01.5,60,5\n2023-11-16 18:00:09.5,6000,5\n")


@pytest.fixture()
def azure_csv(tmp_path: Path) -> Path:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_ROWS)
    return path


def test_auto_detects_an_azure_csv_by_its_header(azure_csv: Path) -> None:
    trace = load_trace(azure_csv)
    assert trace.df["prompt_len"].tolist() == [40, 60, 6000]
    assert trace.meta["loaded_from"]["format"] == "azure"
    windowed = load_trace(azure_csv, "azure", duration_s=5.0, rate_scale=2.0)
    assert windowed.df["arrival_s"].tolist() == [0.0, 0.5]


def test_azure_params_and_max_model_len_go_to_the_importer(azure_csv: Path) -> None:
    with pytest.warns(UserWarning, match="over max_model_len 1 \\(cap"):
        capped = load_trace(azure_csv, max_model_len=4096)
    assert capped.df["prompt_len"].tolist() == [40, 60, 4095]
    with pytest.raises(TraceError, match="row 2: ContextTokens=6000"):
        load_trace(azure_csv, max_model_len=4096, too_long="error")


def test_kvtwin_traces_by_suffix_or_named_format(tmp_path: Path) -> None:
    trace = make_preset("poisson_chat", n=12)
    for fmt in ("parquet", "csv", "jsonl"):
        path = write_trace(trace, tmp_path / f"t.{fmt}")
        got = load_trace(path)
        assert got.meta["loaded_from"]["format"] == f"kvtwin-{fmt}"
        assert got.df.equals(trace.df)
    odd = write_trace(trace, tmp_path / "t.data", fmt="csv")
    assert load_trace(odd, "csv").df.equals(trace.df)


def test_format_and_params_are_checked(tmp_path: Path, azure_csv: Path) -> None:
    kvtwin = write_trace(make_preset("poisson_chat", n=3), tmp_path / "t.csv")
    with pytest.raises(SpecError, match="format='xml'"):
        load_trace(kvtwin, "xml")
    with pytest.raises(SpecError, match="start_s=5 .* only for an Azure trace"):
        load_trace(kvtwin, start_s=5)
    with pytest.raises(TraceError, match="TIMESTAMP='<missing column>'"):
        load_trace(kvtwin, "azure")
    with pytest.raises(TraceError, match="request_id='<missing column>'"):
        load_trace(azure_csv, "kvtwin")


def test_trace_source_of_a_file(tmp_path: Path, azure_csv: Path) -> None:
    digest = hashlib.sha256(azure_csv.read_bytes()).hexdigest()
    bare = trace_source(azure_csv)
    assert bare == {"kind": "file", "path": str(azure_csv.resolve()), "format": "azure",
                    "bytes": len(AZURE_ROWS), "sha256": digest, "file_rows": 3}
    source = trace_source(load_trace(azure_csv, duration_s=5.0))
    assert source["kind"] == "file" and source["sha256"] == digest and source["rows"] == 2
    assert source["import"]["duration_s"] == 5.0
    path = write_trace(make_preset("shared_prefix", n=20), tmp_path / "sp.parquet")
    saved = trace_source(load_trace(path))
    assert saved["kind"] == "file" and saved["format"] == "kvtwin-parquet"
    assert saved["file_rows"] == saved["rows"] == 20
    assert saved["preset"]["name"] == "shared_prefix"  # how the file was generated


def test_trace_source_of_presets(azure_csv: Path) -> None:
    chat = trace_source(make_preset("poisson_chat", n=9, seed=4))
    assert chat == {"kind": "preset", "rows": 9, "seed": 4,
                    "preset": {"name": "poisson_chat", "params": {"n": 9, "rate": 4.0,
                                                                  "seed": 4}}}
    azure = trace_source(make_preset("azure_conv", path=str(azure_csv), duration_s=60.0))
    assert azure["kind"] == "preset" and azure["preset"]["params"]["path"] == str(azure_csv)
    assert azure["sha256"] == hashlib.sha256(azure_csv.read_bytes()).hexdigest()


def test_trace_source_of_a_missing_file(tmp_path: Path) -> None:
    facts = trace_source(tmp_path / "gone.csv")
    assert facts["sha256"] is None and facts["bytes"] is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_lists_every_parameter_with_its_default(name: str) -> None:
    conf = OmegaConf.to_container(OmegaConf.load(WORKLOAD_CONF / f"{name}.yaml"))
    defaults = {k: p.default for k, p in inspect.signature(PRESETS[name]).parameters.items()}
    assert conf["name"] == name and conf["params"] == defaults


def test_every_workload_yaml_is_a_preset() -> None:
    """One file per preset, plus the default: the Azure preset on the committed window."""
    assert sorted(p.stem for p in WORKLOAD_CONF.glob("*.yaml")) == \
        sorted([*PRESETS, "azure_window"])
    window = OmegaConf.to_container(OmegaConf.load(WORKLOAD_CONF / "azure_window.yaml"))
    params = inspect.signature(PRESETS["azure_conv"]).parameters
    assert window["name"] == "azure_conv" and window["params"].keys() == params.keys()


def test_azure_preset_composes_with_a_path_param() -> None:
    from hydra import compose, initialize_config_dir

    from conf.schema import register

    register()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["workload=azure_conv", "workload.params.path=/x/y.csv"])
    assert cfg.workload.params.path == "/x/y.csv" and cfg.workload.path is None


def test_cli_errors_and_warnings_are_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "g.csv"
    garbage.write_bytes(bytes(range(256)))
    assert main(["describe", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {garbage}: row 0: encoding=")
    unsorted = tmp_path / "u.csv"
    unsorted.write_text("request_id,arrival_s,prompt_len,output_len,x\n0,5,10,2,a\n1,1,10,2,b\n")
    assert main(["describe", str(unsorted)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["warning", "warning"]
    assert main(["describe", str(unsorted), "--max-model-len", "11"]) == 2
    assert "output_len=2 is invalid" in capsys.readouterr().err


def test_cli_huge_prompt_is_refused_then_kept_on_request(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    path = tmp_path / "t.csv"
    path.write_text("request_id,arrival_s,prompt_len,output_len\n0,0,1000000000,2\n1,1,9,2\n")
    assert main(["describe", str(path)]) == 2
    assert "row 0: prompt_len=1000000000 is invalid" in capsys.readouterr().err
    assert main(["describe", str(path), "--too-long", "keep", "--json"]) == 0
    assert '"max": 1000000000.0' in capsys.readouterr().out


def test_python_dash_m_describe_of_garbage_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"\x00garbage" * 50)
    result = subprocess.run([sys.executable, "-m", "workloads", "describe", str(path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Parquet" in result.stderr
