//! `dioxide-hostbench [--json] [--ios N] [--qd N]`: see the library docs.

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: u64| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let targets: Vec<&'static str> = match args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        Some(t) if t == "raw" => vec!["raw"],
        Some(t) if t == "generic" => vec!["generic"],
        Some(t) if t == "simple" => vec!["simple"],
        _ => vec!["raw", "generic", "simple"],
    };
    let report = match dioxide_hostbench::run_targets(
        get("--ios", 2_000_000),
        get("--qd", 32) as usize,
        &targets,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dioxide-hostbench: {e}");
            std::process::exit(1);
        }
    };
    if args.iter().any(|a| a == "--json") {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
}
