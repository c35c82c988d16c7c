//! Links the kernel with the boot loader's linker script and generates the
//! interrupt entry stubs (one per vector) as assembly.
use std::fmt::Write;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let script = manifest.join("../bootloader/linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!("cargo:rustc-link-arg-bins=--no-pie");

    // Vectors for which the CPU pushes an error code.
    const WITH_ERROR: [u32; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
    let mut s = String::new();
    s.push_str(".section .text.isr, \"ax\"\n.code64\n");
    for v in 0..256u32 {
        writeln!(s, "isr_stub_{v}:").unwrap();
        if !WITH_ERROR.contains(&v) {
            s.push_str("    push 0\n");
        }
        writeln!(s, "    push {v}\n    jmp isr_common").unwrap();
    }
    s.push_str(".section .rodata.isr, \"a\"\n.balign 8\n.global isr_stub_table\nisr_stub_table:\n");
    for v in 0..256u32 {
        writeln!(s, "    .quad isr_stub_{v}").unwrap();
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("isr_stubs.S");
    std::fs::write(out, s).unwrap();
}
