"""``sevsim run``: the demo guest end to end, with and without the MSR protocol."""

from sevsim.cli import main


def test_run_prints_the_trace_and_a_summary(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no sevsim.toml here
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "LAUNCH_UPDATE_VMSA: SUCCESS" in out
    assert "f3 0f 01 d9    vmgexit" in out
    assert "SEV_INFO_RESP max 2 min 1 C-bit 51" in out
    assert "CPUID_RESP 0x68747541 'Auth'" in out
    assert "VM ended: system event SEV_TERM [0x100]" in out
    assert "[uart] Hello from an SEV-ES guest" in out
    assert "GHCB SVM_EXIT_IOIO  rep outs port 0x3f8 size 1 x 27" in out
    assert "GHCB SVM_VMGEXIT_MMIO_WRITE  8 bytes at 0xd0000008" in out
    assert ("requests: GHCB SVM_EXIT_IOIO 1, GHCB SVM_VMGEXIT_MMIO_READ 2, "
            "GHCB SVM_VMGEXIT_MMIO_WRITE 1, MSR CPUID_REQ 5, MSR SEV_INFO_REQ 1, "
            "MSR TERM_REQ 1") in out  # fmt: skip


def test_run_without_the_msr_protocol(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-p", "no:msr_protocol"]) == 1  # it gave up: see test_cli.py
    out = capsys.readouterr().out
    assert out.count("ignored: no plugin handles this request") == 2
    assert "TERM_REQ set 0 code 1 (GHCB_SEV_ES_PROT_UNSUPPORTED)" in out
    assert "VM ended: Hlt (the guest halted and no interrupt source can wake it)" in out


def test_settings_reach_the_plugin(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sevsim.toml").write_text(
        "[plugins.settings.msr_protocol]\nmin_version = 1\nmax_version = 1\n"
    )
    assert main(["run", "--quiet"]) == 0
    assert "VM ended: system event SEV_TERM" in capsys.readouterr().out
    assert main(["run"]) == 0
    assert "SEV_INFO_RESP max 1 min 1" in capsys.readouterr().out


def test_bad_settings_are_one_line_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sevsim.toml").write_text("[plugins.settings.msr_protocol]\nmax_version = 7\n")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error:") and "max_version = 7" in err


def test_run_without_port_io_the_guest_gives_up_with_its_handlers_reason(capsys, monkeypatch,
                                                                          tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-q", "-p", "no:ioio"]) == 1  # the guest gave up: not a normal end
    captured = capsys.readouterr()
    assert "TERM_REQ set 2 code 3 (sevsim #VC handler: VMM_ERROR)" in captured.out
    assert captured.err.startswith("sevsim: run failed: the guest asked to terminate")


def test_the_v5_11_era_from_the_command_line_and_the_config(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # 5.11 failed KVM_RUN on a termination request (the SEV_TERM event came later)
    # and offered GHCB protocol version 1 only.
    assert main(["run", "--era", "v5.11"]) == 1  # KVM_RUN failed: not a normal end
    out = capsys.readouterr().out
    assert "SEV_INFO_RESP max 1 min 1" in out
    assert "VM ended: KVM_RUN failed: -EINVAL: the guest requested termination (0x100)" in out
    (tmp_path / "sevsim.toml").write_text('[kvm]\nera = "v5.11"\nghcb_version = 1\n')
    assert main(["run", "-q"]) == 1
    assert "-EINVAL" in capsys.readouterr().out
    (tmp_path / "sevsim.toml").write_text('[kvm]\nera = "v4.0"\n')
    assert main(["run", "-q"]) == 2
    assert "era = 'v4.0': expected one of ['newest', 'v5.11']" in capsys.readouterr().err


def test_unclaimed_device_accesses_show_in_the_trace():
    from sevsim.guest.asm import assemble
    from sevsim.guest.image import CODE, GuestImage
    from sevsim.guest.snippets import TERMINATE
    from sevsim.guest.vc_native import vc_image_args
    from sevsim.testing import isolated_host
    from sevsim.vmm.runner import run_image

    image = GuestImage(assemble("mov dx, 0x1234; in al, dx; out dx, al\n" + TERMINATE, CODE),
                       **vc_image_args())  # fmt: skip
    host = isolated_host(enable=["msr_protocol", "ioio"])
    result = run_image(image, host.start(), host.events)
    assert "      [io] unclaimed 1-byte read at 0x1234: all ones" in result.trace.lines
    assert "      [io] unclaimed 1-byte write at 0x1234: dropped" in result.trace.lines


def test_uart_input_reaches_the_guest():
    from sevsim.guest.asm import assemble
    from sevsim.guest.image import CODE, GuestImage
    from sevsim.guest.snippets import TERMINATE
    from sevsim.guest.vc_native import vc_image_args
    from sevsim.testing import isolated_host
    from sevsim.vmm.runner import run_image

    echo = "mov dx, 0x3f8; in al, dx; out dx, al; in al, dx; out dx, al\n"  # echo two bytes
    image = GuestImage(assemble(echo + TERMINATE, CODE), **vc_image_args())
    host = isolated_host(enable=["msr_protocol", "ioio"])
    result = run_image(image, host.start(), host.events, uart_input=b"ok")
    assert "      [uart] ok" in result.trace.lines
