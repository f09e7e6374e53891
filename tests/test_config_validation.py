"""validate_config: every problem of a run config reported together, before anything runs."""

import shutil

import numpy as np
import pytest

from stages.config import (COARSE_KEYS, GEOMETRY_KEYS, MICROSCOPE_KEYS, REFINE_KEYS, ROI_KEYS, RUN_KEYS, SCHEMA,
                           SIMULATION_KEYS, RunConfig, crystal_of, load_config, validate_config,
                           validate_run_config)
from stages.errors import QcbedInputError, QcbedInputErrors
from stages.load import DECONVOLUTION_KEYS, PATTERN_KEYS, RAW_KEYS
from .conftest import DATA

# a CBED run in tmp_path/run/, its crystal one folder up (as the shipped examples)
CBED = """
[crystal]
file = "../si.cif"

[microscope]
hv_kV = 200.0
zone = [1, 1, 0]
x_axis = [1, -1, -1]

[simulation]
thickness_A = 3000.0
absorption = "proportional"
absorption_fraction = 0.02
sg_strong = 0.03

[pattern]
kind = "cbed"
file = "si_cbed.npy"

[geometry]
gl_px = 360.0
rotation_deg = 20.0
centre_px = [285.3, 377.7]

[roi]
disks = [[0, 0, 0], [1, -1, -1]]
regions = [{corners = [[-25.0, 0.0], [25.0, 0.0], [-25.0, 1.0]], samples = [101, 1]}]

[refine]
gof = "Chi2"
reflections = [{hkl = [1, -1, -1], refine = ["U"], range_percent = 5}]
geometry = ["thickness", "gl", "rotation", "shift"]
"""

COARSE = """
[coarse]
enabled = true
thickness_bracket_A = [1000.0, 5000.0]
box_px = 20.0
search_px = 10.0
step_px = 1.0
radius_px = 25.0
background = "per_disk"
disks = [[0, 0, 0], [1, -1, -1]]

[run]
name = "si_cbed-1.0"
"""


@pytest.fixture
def run_dir(tmp_path):
    shutil.copy(DATA / "si.cif", tmp_path / "si.cif")
    d = tmp_path / "run"
    d.mkdir()
    np.save(d / "si_cbed.npy", np.ones((8, 8)))  # only its existence is checked
    return d


def _write(folder, text, name="config.toml"):
    p = folder / name
    p.write_text(text)
    return p


def _errors(path) -> QcbedInputErrors:
    with pytest.raises(QcbedInputErrors) as info:
        validate_config(path)
    return info.value


# ----------------------------------------------------------------------------- clean configs
@pytest.mark.parametrize("name", ["si_cbed", "si_larbed"])
def test_shipped_configs_validate_clean(name):
    path = DATA / name / "config.toml"
    cfg = validate_config(path)
    ref = load_config(path)
    assert cfg.path == ref.path and cfg.data == ref.data


def test_gesn_config_validates_clean():
    """The real-data config (reads ../shared/data/gesn-lacbed; skipped where that folder is absent)."""
    path = DATA / "gesn_lacbed" / "config.toml"
    if not (DATA.parent.parent / "shared" / "data" / "gesn-lacbed").is_dir():
        pytest.skip("../shared/data/gesn-lacbed is not here")
    cfg = validate_config(path)
    assert cfg.section("coarse")["align_disks"] is True and len(cfg.section("roi")["disks"]) == 17


def test_relative_paths_resolve_against_the_config_folder(run_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the config's folder
    cfg = validate_config(_write(run_dir, CBED))
    assert cfg.base_dir == run_dir.resolve()
    assert crystal_of(cfg).name  # ../si.cif read from tmp_path
    # the same config one folder deeper no longer finds its crystal
    deeper = run_dir / "deeper"
    deeper.mkdir()
    np.save(deeper / "si_cbed.npy", np.ones((8, 8)))
    with pytest.raises(QcbedInputError) as info:
        validate_config(_write(deeper, CBED))
    assert info.value.field == "crystal.file" and str(deeper.parent / "si.cif") in str(info.value)


def test_schema_keys_are_the_sections_keys():
    for section, keys in [("microscope", MICROSCOPE_KEYS), ("simulation", SIMULATION_KEYS), ("geometry", GEOMETRY_KEYS),
                          ("roi", ROI_KEYS), ("refine", REFINE_KEYS), ("coarse", COARSE_KEYS), ("run", RUN_KEYS),
                          ("pattern", set(PATTERN_KEYS))]:
        assert set(SCHEMA[section].keys) == set(keys), section
    assert set(SCHEMA["pattern"].keys["raw"].keys) == set(RAW_KEYS)
    assert set(SCHEMA["pattern"].keys["deconvolution"].keys) == set(DECONVOLUTION_KEYS)


# ----------------------------------------------------------------------------- all problems together
def test_five_mistakes_in_five_sections_are_reported_together(run_dir):
    text = (CBED.replace('x_axis = [1, -1, -1]', 'x_axis = [1, -1, -1]\nvoltage = 200')       # unknown key
            .replace('sg_strong = 0.03', 'sg_strong = "0.03"')                                # wrong type
            .replace('gl_px = 360.0', 'gl_px = -360.0')                                       # out of range
            .replace('thickness_A = 3000.0\n', '')                                            # missing key
            .replace('file = "si_cbed.npy"', 'file = "nope.npy"'))                            # missing file
    err = _errors(_write(run_dir, text))
    expected = {"microscope.voltage", "simulation.sg_strong", "geometry.gl_px", "simulation.thickness_A",
                "pattern.file"}
    assert sorted(e.field for e in err.errors) == sorted(expected)
    assert isinstance(err, QcbedInputError) and all(isinstance(e, QcbedInputError) for e in err.errors)
    lines = str(err).splitlines()
    assert lines[0].endswith("config.toml: 5 problems") and len(lines) == 6
    for f in expected:
        assert sum(line.startswith(f"  {f}: ") for line in lines[1:]) == 1
    assert "unknown key" in str(err) and "allowed: hv_kV" in str(err)
    assert str(run_dir / "nope.npy") in str(err)


def test_single_problem_is_one_line(run_dir):
    err = _errors(_write(run_dir, CBED.replace("gl_px = 360.0", "gl_px = 0")))
    assert len(err.errors) == 1 and err.field == "geometry.gl_px"
    assert "\n" not in str(err) and str(err) == str(err.errors[0])
    assert str(err).startswith("geometry.gl_px: must be > 0, got 0")


def test_missing_or_malformed_file_is_a_single_error(tmp_path):
    with pytest.raises(QcbedInputError, match="config file not found"):
        validate_config(tmp_path / "none.toml")
    with pytest.raises(QcbedInputError, match="malformed TOML") as info:
        validate_config(_write(tmp_path, "[crystal\n"))
    assert not isinstance(info.value, QcbedInputErrors)


def test_builder_problems_are_reported_once_with_their_field(run_dir):
    text = (CBED.replace("x_axis = [1, -1, -1]", "x_axis = [1, 1, 1]")     # not in the zone (ForwardModel)
            .replace('gof = "Chi2"', 'gof = "NoSuchMetric"')                 # make_gof
            .replace("samples = [101, 1]", "samples = [101, 0]"))            # schema and Region
    err = _errors(_write(run_dir, text))
    assert sorted(err.fields) == ["microscope.x_axis", "refine.gof", "roi.regions[0].samples"]
    # a forbidden reflection, found by the structure-factor builder, names its entry
    text = CBED.replace('{hkl = [1, -1, -1], refine = ["U"], range_percent = 5}',
                        '{hkl = [1, -1, -1]}, {hkl = [1, 0, 0]}')
    err = _errors(_write(run_dir, text))
    assert err.fields == ["refine.reflections[1].hkl"] and "forbidden" in str(err)


def test_unknown_and_missing_sections(run_dir):
    text = CBED.replace("[geometry]\ngl_px = 360.0\nrotation_deg = 20.0\ncentre_px = [285.3, 377.7]\n", "") + "[extra]\na = 1\n"
    err = _errors(_write(run_dir, text))
    assert sorted(err.fields) == ["extra", "geometry"]


def test_pattern_files_glob_must_match(run_dir):
    text = CBED.replace('kind = "cbed"\nfile = "si_cbed.npy"', 'kind = "larbed"\nfiles = "Si_*.npy"')
    err = _errors(_write(run_dir, text))
    assert "pattern.files" in err.fields and "matches no file" in str(err)


# ----------------------------------------------------------------------------- [coarse] and [run]
def test_coarse_and_run_sections_validate(run_dir):
    path = _write(run_dir, CBED + COARSE)
    cfg = validate_config(path)
    assert cfg.section("coarse")["background"] == "per_disk" and cfg.section("run")["name"] == "si_cbed-1.0"
    assert load_config(path).section("coarse")["box_px"] == 20.0


@pytest.mark.parametrize("old, new, field", [
    ("enabled = true", 'enabled = "yes"', "coarse.enabled"),
    ("thickness_bracket_A = [1000.0, 5000.0]", "thickness_bracket_A = [5000.0, 1000.0]", "coarse.thickness_bracket_A"),
    ("thickness_bracket_A = [1000.0, 5000.0]", "thickness_bracket_A = [0.0, 1000.0]", "coarse.thickness_bracket_A"),
    ("box_px = 20.0", "box_px = 0.0", "coarse.box_px"),
    ("search_px = 10.0", "search_px = -1.0", "coarse.search_px"),
    ("step_px = 1.0", "step_px = 0", "coarse.step_px"),
    ("radius_px = 25.0", "radius_px = -25.0", "coarse.radius_px"),
    ('background = "per_disk"', 'background = "both"', "coarse.background"),
    ("disks = [[0, 0, 0], [1, -1, -1]]\n\n[run]", "disks = [[0, 0], [1, -1, -1]]\n\n[run]", "coarse.disks[0]"),
    ("radius_px = 25.0", "radius_px = 25.0\nwidth_px = 3", "coarse.width_px"),
    ('name = "si_cbed-1.0"', 'name = "../results"', "run.name"),
    ('name = "si_cbed-1.0"', 'name = "my run"', "run.name"),
    ('name = "si_cbed-1.0"', "name = 3", "run.name"),
    ("radius_px = 25.0", "radius_px = 25.0\nalign_disks = true", "coarse.align_disks"),
    ("radius_px = 25.0", "radius_px = 25.0\nmax_disk_shift_px = 0.0", "coarse.max_disk_shift_px"),
    ("radius_px = 25.0", "radius_px = 25.0\ngl_bracket_px = [20.0, 10.0]", "coarse.gl_bracket_px"),
    ("radius_px = 25.0", "radius_px = 25.0\nfit_gl = 1", "coarse.fit_gl"),
])
def test_coarse_and_run_sections_reject_bad_values(run_dir, old, new, field):
    text = (CBED + COARSE).replace(old, new)
    assert text != CBED + COARSE
    err = _errors(_write(run_dir, text))
    assert err.fields == [field]


def test_load_config_accepts_coarse_and_run_but_rejects_unknown_keys(run_dir):
    with pytest.raises(QcbedInputError, match="coarse.width_px: unknown key"):
        load_config(_write(run_dir, CBED + COARSE.replace("box_px", "width_px")))
    with pytest.raises(QcbedInputError, match="run.folder: unknown key"):
        load_config(_write(run_dir, CBED + COARSE.replace("name =", "folder =")))


def test_errors_pickle_and_keep_their_text(run_dir):
    import pickle

    err = _errors(_write(run_dir, CBED.replace("gl_px = 360.0", "gl_px = 0").replace("hv_kV = 200.0", "hv_kV = 1.0")))
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, QcbedInputErrors) and str(back) == str(err) and back.fields == err.fields


def test_validate_run_config_in_memory_and_required_sections(run_dir):
    import tomllib

    path = _write(run_dir, CBED)
    cfg = RunConfig(path.resolve(), tomllib.loads(CBED))  # e.g. from a run record
    assert validate_run_config(cfg) is cfg
    bad = RunConfig(path.resolve(), tomllib.loads(CBED.replace("hv_kV = 200.0", "hv_kV = -1.0")))
    with pytest.raises(QcbedInputErrors, match="microscope.hv_kV: must be in"):
        validate_run_config(bad)
    no_refine = _write(run_dir, CBED[: CBED.index("[refine]")], "prepare.toml")
    validate_config(no_refine)  # [refine] is optional ...
    with pytest.raises(QcbedInputErrors) as info:  # ... unless required
        validate_config(no_refine, require=("refine",))
    assert info.value.fields == ["refine"]


def test_absent_data_say_where_to_get_them(tmp_path):
    """A config whose data live elsewhere (the GeSn set in ../shared/data) names its source when they are absent."""
    here = tmp_path / "a" / "b" / "c"  # ../../../shared is then tmp_path/shared: absent
    here.mkdir(parents=True)
    (here / "gesn.toml").write_text((DATA / "gesn_lacbed" / "gesn.toml").read_text())
    (here / "config.toml").write_text((DATA / "gesn_lacbed" / "config.toml").read_text())
    err = _errors(here / "config.toml")
    assert err.fields == ["pattern.files"]
    assert "Felix-python" in str(err) and "shared/data/gesn-lacbed" in str(err)


def test_laue_zones_and_holz_lines(run_dir):
    """simulation.laue_zones must be one of its three words and holz_lines a boolean, each error naming its
    field; "holz" turns the HOLZ beam set on, holz_lines keeps every near-Bragg HOLZ beam exact."""
    from stages.config import forward_model

    err = _errors(_write(run_dir, CBED.replace("sg_strong = 0.03", 'sg_strong = 0.03\nlaue_zones = "HOLZ"')))
    assert err.field == "simulation.laue_zones" and "'auto', 'zolz', 'holz'" in str(err)
    err = _errors(_write(run_dir, CBED.replace("sg_strong = 0.03", 'sg_strong = 0.03\nholz_lines = "yes"')))
    assert err.field == "simulation.holz_lines"
    cfg = validate_config(_write(run_dir, CBED.replace("sg_strong = 0.03", 'sg_strong = 0.03\nlaue_zones = "holz"\n'
                                                                              'holz_lines = true')))
    sel = forward_model(cfg).selection
    assert sel.holz and sel.holz_u_strong == 0.0
    assert not forward_model(validate_config(_write(run_dir, CBED))).selection.holz  # "auto" starts from ZOLZ


def test_acentric_reflections_name_amplitude_and_phase(run_dir):
    """GaAs (F-43m): 1 -1 -1 is acentric. Plain "U" there is refused, naming the entry's refine field; U_amp /
    U_phase pass the schema and the builder; on a centric reflection (2 -2 0) they are refused."""
    shutil.copy(DATA.parent / "tests" / "data" / "gaas.cif", run_dir.parent / "gaas.cif")
    gaas = CBED.replace('file = "../si.cif"', 'file = "../gaas.cif"')
    err = _errors(_write(run_dir, gaas))
    assert err.fields == ["refine.reflections[0].refine"]
    assert "acentric" in str(err) and "U_amp" in str(err) and "U_phase" in str(err)
    for comps in ('["U_amp", "U_phase"]', '["U_amp"]', '["U_phase"]', '["U_amp", "U_phase", "Uprime_amp"]'):
        validate_config(_write(run_dir, gaas.replace('refine = ["U"]', f"refine = {comps}, U_phase_range = [-60.0, 0.0]"
                                                     if "U_phase" in comps else f"refine = {comps}")))
    centric = gaas.replace('reflections = [{hkl = [1, -1, -1], refine = ["U"], range_percent = 5}]',
                           'reflections = [{hkl = [1, -1, -1], refine = ["U_amp"]}, {hkl = [2, -2, 0], refine = ["U_phase"]}]')
    err = _errors(_write(run_dir, centric))
    assert err.fields == ["refine.reflections[1].refine"] and "centric" in str(err)
    err = _errors(_write(run_dir, gaas.replace('refine = ["U"]', 'refine = ["U_ampl"]')))
    assert err.fields == ["refine.reflections[0].refine"] and "Uprime_phase" in str(err)


# ----------------------------------------------------------------------------- [coarse] refine: voltage, cell, B
HOLZ = 'sg_strong = 0.03\nlaue_zones = "holz"\nholz_lines = true'


def _physics(run_dir, lines: str, simulation: str = HOLZ, crystal: str | None = None):
    """validate_config of the CBED run with [coarse] + ``lines`` (and HOLZ on)."""
    text = (CBED + COARSE).replace("sg_strong = 0.03", simulation)
    text = text.replace('disks = [[0, 0, 0], [1, -1, -1]]\n\n[run]', 'disks = [[0, 0, 0], [1, -1, -1]]\n' + lines + '\n\n[run]')
    if crystal is not None:
        text = text.replace('file = "../si.cif"', crystal)
    return _write(run_dir, text)


def test_coarse_refine_keys_and_defaults(run_dir):
    """coarse.refine switches the fits that re-solve on; coarse_physics applies every default."""
    from stages.config import CELL_RANGE_PERCENT, HV_HALF_RANGE_KV, coarse_physics

    cfg = validate_config(_physics(run_dir, 'refine = ["B", "voltage"]'))
    p = coarse_physics(cfg, crystal_of(cfg))
    assert p.refine == ("voltage", "B") and p.needs_holz  # run order, whatever the list's order
    assert p.hv_range_kV == (200.0 - HV_HALF_RANGE_KV, 200.0 + HV_HALF_RANGE_KV)
    b = crystal_of(cfg).sites[0].b_iso
    assert p.sites == (0,) and p.site_labels == ("Si1",) and p.b_ranges_A2[0] == pytest.approx((0.5 * b, 1.5 * b))
    cfg = validate_config(_physics(run_dir, 'refine = ["cell", "B"]\ncell_range_percent = 0.5\nB_sites = ["Si1"]\n'
                                            "B_range_A2 = {Si1 = [0.2, 0.9]}"))
    p = coarse_physics(cfg, crystal_of(cfg))
    assert p.crystal_system == "cubic" and p.cell_free == ("a",) and p.cell_rel == 0.005
    assert p.sites == (0,) and p.b_ranges_A2 == ((0.2, 0.9),) and p.hv_range_kV is None
    cfg = validate_config(_physics(run_dir, 'refine = ["cell"]\nB_sites = [0]\nhv_range_kV = [190.0, 210.0]'))
    assert coarse_physics(cfg, crystal_of(cfg)).cell_rel == CELL_RANGE_PERCENT / 100  # unused ranges are allowed
    cfg = validate_config(_physics(run_dir, "refine = []"))
    assert coarse_physics(cfg, crystal_of(cfg)).refine == ()
    # B alone needs no HOLZ
    validate_config(_physics(run_dir, 'refine = ["B"]\nB_sites = [0]\nB_range_A2 = [0.0, 1.0]', "sg_strong = 0.03"))


HEX = '''name = "Mg"
cell = [3.21, 3.21, 5.21, 90.0, 90.0, 120.0]
spacegroup = "P 63/m m c"
atoms = [{label = "Mg1", xyz = [0.3333333, 0.6666667, 0.25], B = 0.8}]'''
MONO = '''name = "m"
cell = [5.0, 6.0, 7.0, 90.0, 100.0, 90.0]
spacegroup = "P 1 2/m 1"
atoms = [{label = "Fe1", xyz = [0.1, 0.2, 0.3], B = 0.5}]'''
RHOMB = '''name = "r"
cell = [5.0, 5.0, 5.0, 70.0, 70.0, 70.0]
spacegroup = "R -3 m:R"
atoms = [{label = "Bi1", xyz = [0.2, 0.2, 0.2], B = 0.5}]'''


def test_coarse_cell_follows_the_crystal_system(run_dir):
    """Hexagonal: a and c free; monoclinic (free beta) and rhombohedral axes (free alpha) refused, naming the fix.
    (The CBED geometry is for Si [110]: only the [coarse] physics is built from these crystals.)"""
    import tomllib

    from stages.config import coarse_physics

    def physics_of(crystal):
        text = _physics(run_dir, 'refine = ["cell"]', crystal=crystal).read_text()
        cfg = RunConfig((run_dir / "config.toml").resolve(), tomllib.loads(text))
        return coarse_physics(cfg, crystal_of(cfg))

    p = physics_of(HEX)
    assert p.crystal_system == "hexagonal" and p.cell_free == ("a", "c")
    for crystal, system, fix in ((MONO, "monoclinic", 'remove "cell"'), (RHOMB, "rhombohedral", "R -3 m:H")):
        with pytest.raises(QcbedInputError) as info:
            physics_of(crystal)
        assert info.value.field == "coarse.refine" and f"is {system}" in str(info.value) and fix in str(info.value)


@pytest.mark.parametrize("lines, field, words", [
    ('refine = ["voltage", "HV"]', "coarse.refine", "unknown entry 'HV'"),
    ('refine = "voltage"', "coarse.refine", "list of strings"),
    ('refine = ["B", "B"]', "coarse.refine", "twice"),
    ('refine = ["voltage", "cell"]', "coarse.refine", "cannot be refined together"),
    ('refine = ["voltage"]\nhv_range_kV = [201.0, 205.0]', "coarse.hv_range_kV", "does not contain the start"),
    ('refine = ["voltage"]\nhv_range_kV = [205.0, 201.0]', "coarse.hv_range_kV", "low < high"),
    ('refine = ["B"]\nB_sites = ["Ge1"]', "coarse.B_sites", "no atom site 'Ge1'"),
    ('refine = ["B"]\nB_sites = [3]', "coarse.B_sites", "out of range"),
    ('refine = ["B"]\nB_sites = []', "coarse.B_sites", "non-empty list"),
    ('refine = ["B"]\nB_range_A2 = [-0.2, 0.5]', "coarse.B_range_A2", "0 <= low < high"),
    ('refine = ["B"]\nB_range_A2 = [0.0, 0.0]', "coarse.B_range_A2", "0 <= low < high"),
    ('refine = ["B"]\nB_range_A2 = {Si1 = [0.5, -0.5]}', "coarse.B_range_A2.Si1", "0 <= low < high"),
    ('refine = ["B"]\nB_range_A2 = {Ge = [0.2, 0.5]}', "coarse.B_range_A2.Ge", "not a refined site"),
    ('refine = ["cell"]\ncell_range_percent = 0.0', "coarse.cell_range_percent", "in (0, 20]"),
])
def test_coarse_refine_rejects_bad_input(run_dir, lines, field, words):
    err = _errors(_physics(run_dir, lines))
    assert err.fields == [field] and words in str(err)
    assert err.errors[0].fix  # every problem says how to fix it


def test_coarse_voltage_and_cell_need_the_holz_lines(run_dir):
    err = _errors(_physics(run_dir, 'refine = ["voltage"]', 'sg_strong = 0.03\nlaue_zones = "zolz"'))
    assert err.fields == ["coarse.refine"] and "HOLZ lines" in str(err) and 'laue_zones = "holz"' in str(err)
    err = _errors(_physics(run_dir, 'refine = ["cell"]', 'sg_strong = 0.03\nlaue_zones = "zolz"'))
    assert err.fields == ["coarse.refine"] and "cell is measured by the HOLZ lines" in str(err)
    validate_config(_physics(run_dir, 'refine = ["voltage"]', "sg_strong = 0.03"))  # "auto": decided at run time


def test_coarse_refine_problems_are_reported_together(run_dir):
    err = _errors(_physics(run_dir, 'refine = ["voltage", "B"]\nhv_range_kV = [100.0, 150.0]\nB_sites = ["X"]\n'
                                    "cell_range_percent = -1.0"))
    assert sorted(err.fields) == ["coarse.B_sites", "coarse.cell_range_percent", "coarse.hv_range_kV"]

def test_larbed_psf_start_must_fit_the_padding(tmp_path):
    """A PSF start wider than roi.padding holds is found by validation, before any stage runs, with the
    padding it needs; a skewed region's grid is measured by its own step vectors."""
    text = (DATA / "si_larbed" / "config.toml").read_text().replace('file = "../si.cif"', f'file = "{DATA / "si.cif"}"')
    for name in ("si_larbed.npy", "si_larbed_variance.npy"):
        (tmp_path / name).symlink_to(DATA / "si_larbed" / name)
    path = _write(tmp_path, text.replace("padding = 9", "padding = 5"))
    (err,) = _errors(path).errors
    assert err.field == "roi.padding" and "at least 6" in err.fix  # 4 x 1.5 + 8 x 0.05 + 0.24 = 6.64 > 6
    assert validate_config(_write(tmp_path, text.replace("psf_sigma = 1.5", "psf_sigma = 1.0").replace(
        "padding = 9", "padding = 5")))
    # the same region with its p1 -> p3 edge at 60 degrees: grid steps 1 and 0.5 x (1, sqrt 3)
    skew = text.replace("[-10.0, 10.0]], samples", "[0.0, 7.3205]], samples")
    (err,) = _errors(_write(tmp_path, skew.replace("padding = 9", "padding = 6"))).errors
    assert err.field == "roi.padding" and "at least 7," in err.fix  # 6.93 >= 6.64 > 6.08 (padding 6)


# ----------------------------------------------------------------------------- disks at absences, zone, zero IAM
def test_disk_at_a_centring_absence_is_refused_glide_absence_warned(run_dir):
    """(0 0 1) of Si is absent by the F centring: no beam exists, the disk is mislabelled (refused);
    (0 0 2) is absent by the d glide only and excited by double diffraction (a warning)."""
    from stages.config import QcbedInputWarning

    bad = CBED.replace("disks = [[0, 0, 0], [1, -1, -1]]", "disks = [[0, 0, 0], [0, 0, 1]]")
    (err,) = _errors(_write(run_dir, bad)).errors
    assert err.field == "roi.disks[1]" and "lattice centring" in err.problem and "h k l" in err.fix
    glide = CBED.replace("disks = [[0, 0, 0], [1, -1, -1]]", "disks = [[0, 0, 0], [0, 0, 2]]")
    with pytest.warns(QcbedInputWarning, match=r"roi.disks\[1\]: 0 0 2 is kinematically absent"):
        validate_config(_write(run_dir, glide))


def test_larbed_image_outside_the_zone_is_refused(tmp_path):
    text = (DATA / "si_larbed" / "config.toml").read_text().replace('file = "../si.cif"', f'file = "{DATA / "si.cif"}"')
    for name in ("si_larbed.npy", "si_larbed_variance.npy"):
        (tmp_path / name).symlink_to(DATA / "si_larbed" / name)
    assert "[-2, 2, 2]]" in text
    (err,) = _errors(_write(tmp_path, text.replace("[-2, 2, 2]]", "[1, 1, 1]]"))).errors
    assert err.field == "pattern.hkl[4]" and "1 1 1 is outside the zone [1 1 0] (g . zone = 2)" in err.problem
    assert "microscope.zone" in err.fix


def test_range_percent_of_a_zero_iam_value_is_refused(run_dir):
    """U(2 2 2) of Si is zero in the IAM: ± 5 % of it is an empty range (was silently ± 2e-3)."""
    zero = CBED.replace("hkl = [1, -1, -1], refine", "hkl = [2, -2, -2], refine")
    (err,) = _errors(_write(run_dir, zero)).errors
    assert err.field == "refine.reflections[0].range_percent" and "starts at 0" in err.problem
    assert "U_range = [low, high]" in err.fix
    validate_config(_write(run_dir, zero.replace("range_percent = 5", "U_range = [-0.002, 0.001]")))


def test_larbed_image_names_outside_the_zone_are_refused_when_loaded(tmp_path):
    """h k l from the file names are known once the pattern is loaded: the roi stage refuses an image outside
    the zone there, naming its file."""
    from stages import pipeline as P

    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(DATA / "si.cif", tmp_path / "si.cif")
    stack = np.load(DATA / "si_larbed" / "si_larbed.npy")
    names = ["Si_+0+0+0.npy", "Si_+1-1-1.npy", "Si_+1+1+1.npy"]
    for n, img in zip(names, stack):
        np.save(d / n, img)
    text = (DATA / "si_larbed" / "config.toml").read_text()
    text = text.replace('file = "si_larbed.npy"\nhkl = [[0, 0, 0], [1, -1, -1], [-1, 1, 1], [2, -2, -2], [-2, 2, 2]]\n'
                        'variance = "si_larbed_variance.npy"', 'files = "Si_*.npy"')
    assert 'files = "Si_*.npy"' in text
    cfg = validate_config(_write(d, text), require=("refine",))
    plan = P.make_plan(cfg, tmp_path / "results")
    P.run_stage(plan, "load", say=lambda m: None)
    with pytest.raises(QcbedInputError) as info:
        P.run_stage(plan, "roi", say=lambda m: None)
    assert info.value.field == "pattern.files (image 1: Si_+1+1+1.npy)"
    assert "outside the zone [1 1 0]" in info.value.problem
