//! `cargo bench -p dioxide-hostbench`: the host benchmark of the 4K read path.

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

fn main() {
    let report = dioxide_hostbench::run(2_000_000, 32).unwrap_or_else(|e| panic!("{e}"));
    print!("{}", report.table());
}
