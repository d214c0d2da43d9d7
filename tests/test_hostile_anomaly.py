"""The flag for the cheat the harness cannot prevent where its host allows no confinement."""

from rfs.collect import anomaly

SUMMARY = "| step 50\n---\nval_bpb:          1.500000\nisolation:        {}\nstatus:           success\n"


def test_a_success_without_namespaces_is_flagged_unconfined():
    def flag(isolation: str, status: str = "success"):
        return anomaly.unconfined({"status": status, "stdout_tail": SUMMARY.format(isolation)})

    assert flag("audit hook only: this host allows no mount namespace, the data cache stays visible") == "unconfined"
    assert flag("none: this host allows no mount namespace, the validation file stays readable (handover only)") == "unconfined"
    assert flag("mount+pid namespaces") is None and flag("user+mount+pid namespaces") is None
    assert flag("audit hook only", status="crash") is None  # no number to distrust
    # train.py printing a confinement line of its own changes nothing: only the harness's unprefixed line counts
    forged = "| isolation: mount+pid namespaces\n" + SUMMARY.format("audit hook only")
    assert anomaly.unconfined({"status": "success", "stdout_tail": forged}) == "unconfined"
    assert anomaly.unconfined({"status": "success", "stdout_tail": "val_bpb: 1.5\n"}) is None  # runs from before the line
