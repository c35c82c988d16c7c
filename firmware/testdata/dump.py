#!/usr/bin/env python3
"""Dump a QEMU's ACPI tables into OUTDIR, one file per table (README.md).

usage: dump.py QEMU MACHINE OUTDIR [QEMU ARGS...]

Boots `QEMU -machine MACHINE -nodefaults -m 128 -accel tcg` (SeaBIOS; with no
disk it stays in the BIOS), saves the first 128 MiB of guest RAM with QMP
`pmemsave` after 3 s, finds the RSDP in 0xE0000..0x100000 and cuts out every
table the RSDT (or the XSDT, when there is one) lists, plus the FADT's DSDT,
at its header's length. Prints each table's signature, address, length and
revision. QEMU ARGS go first, e.g. `-L DIR` for another SeaBIOS.
"""
import json, os, shutil, socket, struct, subprocess, sys, tempfile, time

qemu, machine, out, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
tmp = tempfile.mkdtemp()
sock, ram = os.path.join(tmp, "qmp.sock"), os.path.join(tmp, "ram.bin")
vm = subprocess.Popen(
    [qemu, *extra, "-machine", machine, "-nodefaults", "-m", "128",
     "-accel", "tcg", "-display", "none",
     "-qmp", f"unix:{sock},server=on,wait=off"],
    stdout=subprocess.DEVNULL)
try:
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            break
        except OSError:
            s.close()
            time.sleep(0.05)
    else:
        sys.exit("QMP socket never answered")
    qmp = s.makefile("rw")

    def cmd(name, **args):
        qmp.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        qmp.flush()
        while True:  # skip events
            r = json.loads(qmp.readline())
            if "return" in r or "error" in r:
                return r

    json.loads(qmp.readline())  # greeting
    cmd("qmp_capabilities")
    time.sleep(3)
    v = cmd("query-version")["return"]["qemu"]
    print(f"QEMU {v['major']}.{v['minor']}.{v['micro']} {machine}")
    r = cmd("pmemsave", val=0, size=128 << 20, filename=ram)
    assert "return" in r, r
    mem = open(ram, "rb").read()
finally:
    vm.kill()
    vm.wait()
    shutil.rmtree(tmp)

os.makedirs(out, exist_ok=True)


def save(sig, addr, t, rev):
    open(os.path.join(out, sig + ".bin"), "wb").write(t)
    print(f"{sig} {addr:#x} {len(t)} B rev {rev}")


def cut(addr):
    sig = mem[addr:addr + 4].decode()
    length, rev = struct.unpack_from("<IB", mem, addr + 4)
    t = mem[addr:addr + length]
    assert sum(t) & 0xFF == 0, f"{sig} at {addr:#x}: bad checksum"
    save(sig, addr, t, rev)
    return t


rsdp = next(a for a in range(0xE0000, 0x100000, 16)
            if mem[a:a + 8] == b"RSD PTR " and sum(mem[a:a + 20]) & 0xFF == 0)
rev = mem[rsdp + 15]
save("RSDP", rsdp, mem[rsdp:rsdp + (20 if rev < 2 else 36)], rev)
root = cut(struct.unpack_from("<I", mem, rsdp + 16)[0])
width, fmt = 4, "<I"
if rev >= 2 and struct.unpack_from("<Q", mem, rsdp + 24)[0]:
    root = cut(struct.unpack_from("<Q", mem, rsdp + 24)[0])
    width, fmt = 8, "<Q"
for i in range(36, len(root), width):
    t = cut(struct.unpack_from(fmt, root, i)[0])
    if t[:4] == b"FACP":
        cut(struct.unpack_from("<I", t, 40)[0])
