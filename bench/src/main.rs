//! `dioxide-hostbench [--json] [--ios N] [--qd N] [--only raw|generic|simple|raw-write|simple-write] [--threads 1,2|auto]`:
//! see the library docs. `--threads`: after the single-thread run, the
//! same targets on T threads side by side for each T of the list.
//!
//! `dioxide-hostbench --guard [--ios N]`: the protection-information guards
//! (`dioxide-pi`: CRC-16/T10-DIF, CRC-64/NVMe) per byte over 4 KiB blocks.
//!
//! `dioxide-hostbench --nbd [--json] [--ios N] [--qd 1,16,128] [--only file|raw|null] [--csum off|on] [--mtu 1500,9000] [--tso on|off] [--threads 1,2,4|auto]`:
//! the whole NBD request path (module `nbd`); JSON `{"host_rows": [...]}`.
//! `--threads`: after those rows, the same rows on T threads side by side
//! for each T of the list (`nbd::run_threads`); the JSON then also has
//! `host_threads_rows`, `cpus_online` and `cpus_allowed`.

#[global_allocator]
static A: dioxide_hostbench::CountingAlloc = dioxide_hostbench::CountingAlloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
    };
    let get = |k: &str, d: u64| value(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let targets: Vec<&'static str> = match value("--only") {
        Some(t) if t == "raw" => vec!["raw"],
        Some(t) if t == "generic" => vec!["generic"],
        Some(t) if t == "simple" => vec!["simple"],
        Some(t) if t == "raw-write" => vec!["raw-write"],
        Some(t) if t == "simple-write" => vec!["simple-write"],
        _ => vec!["raw", "generic", "simple", "raw-write", "simple-write"],
    };
    let fail = |e: String| -> ! {
        eprintln!("dioxide-hostbench: {e}");
        std::process::exit(1);
    };
    if args.iter().any(|a| a == "--guard") {
        // The protection-information guards (issue 23's target: at most
        // 0.25 cycles per byte).
        println!("guard  block  ns/byte  TSC cycles/byte");
        for r in dioxide_hostbench::guard_rows(get("--ios", 200_000)) {
            println!(
                "{:6} {:5} {:8.3} {:16.3}",
                r.guard, r.block, r.ns_per_byte, r.cycles_per_byte
            );
        }
        return;
    }
    if args.iter().any(|a| a == "--nbd") {
        let qds: Vec<usize> = match value("--qd")
            .map(|v| v.split(',').map(|q| q.trim().parse::<usize>()).collect())
        {
            None => vec![1, 16, 128],
            Some(Ok(q)) => q,
            Some(Err(e)) => fail(format!("--qd: {e}")),
        };
        let targets: Vec<&'static str> = match value("--only").map(String::as_str) {
            Some("file") => vec!["file"],
            Some("raw") => vec!["raw"],
            Some("null") => vec!["null"],
            Some(t) => fail(format!("--only {t}: file, raw or null")),
            None => vec!["file", "raw", "null"],
        };
        let csums: Vec<bool> = match value("--csum").map(String::as_str) {
            Some("off") => vec![false],
            Some("on") => vec![true],
            Some(c) => fail(format!("--csum {c}: off or on")),
            None => vec![false, true],
        };
        let mtus: Vec<usize> = match value("--mtu").map(|v| {
            v.split(',')
                .map(|m| m.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
        }) {
            None => vec![1500, 9000],
            Some(Ok(m)) if m.iter().all(|&m| (576..=9000).contains(&m)) => m,
            Some(_) => fail("--mtu: MTUs from 576 to 9000, e.g. 1500,9000".into()),
        };
        // Checksum offload at each MTU, and TSO (with checksum offload)
        // at the first MTU.
        let tso = match value("--tso").map(String::as_str) {
            Some("off") => false,
            Some("on") | None => true,
            Some(t) => fail(format!("--tso {t}: off or on")),
        };
        let mut links: Vec<dioxide_service::loopback::Link> = mtus
            .iter()
            .flat_map(|&mtu| {
                csums
                    .iter()
                    .map(move |&csum| dioxide_service::loopback::Link {
                        csum,
                        mtu,
                        tso: false,
                    })
            })
            .collect();
        if tso && csums.contains(&true) {
            links.push(dioxide_service::loopback::Link {
                csum: true,
                mtu: mtus[0],
                tso: true,
            });
        }
        let threads = match value("--threads").map(|t| dioxide_hostbench::parse_threads(t)) {
            None => Vec::new(),
            Some(Ok(t)) => t,
            Some(Err(e)) => fail(e),
        };
        let ios = get("--ios", 200_000);
        let rows =
            dioxide_hostbench::nbd::run(ios, &targets, &qds, &links).unwrap_or_else(|e| fail(e));
        let threads_rows = if threads.is_empty() {
            Vec::new()
        } else {
            dioxide_hostbench::nbd::run_threads(ios, &targets, &qds, &links, &threads)
                .unwrap_or_else(|e| fail(e))
        };
        let (online, allowed) = (
            dioxide_hostbench::online_cpus(),
            dioxide_hostbench::allowed_cpus(),
        );
        if args.iter().any(|a| a == "--json") {
            let rows: Vec<String> = rows.iter().map(|r| r.json()).collect();
            if threads.is_empty() {
                println!("{{\"host_rows\": [{}]}}", rows.join(", "));
            } else {
                let t: Vec<String> = threads_rows.iter().map(|r| r.json()).collect();
                let cpus: Vec<String> = allowed.iter().map(usize::to_string).collect();
                println!(
                    "{{\"host_rows\": [{}], \"host_threads_rows\": [{}], \"cpus_online\": {online}, \"cpus_allowed\": [{}]}}",
                    rows.join(", "),
                    t.join(", "),
                    cpus.join(", ")
                );
            }
        } else {
            print!("{}", dioxide_hostbench::nbd::NbdRow::table(&rows));
            if !threads.is_empty() {
                print!(
                    "\n{}",
                    dioxide_hostbench::nbd::NbdThreadsRow::table(&threads_rows, online, &allowed)
                );
            }
        }
        return;
    }
    let threads = match value("--threads").map(|t| dioxide_hostbench::parse_threads(t)) {
        None => Vec::new(),
        Some(Ok(t)) => t,
        Some(Err(e)) => fail(e),
    };
    let (ios, qd) = (get("--ios", 2_000_000), get("--qd", 32) as usize);
    let mut report = dioxide_hostbench::run_targets(ios, qd, &targets).unwrap_or_else(|e| fail(e));
    for t in threads {
        let rows = dioxide_hostbench::run_threads(ios, qd, &targets, t).unwrap_or_else(|e| fail(e));
        report.threads_rows.extend(rows);
    }
    if args.iter().any(|a| a == "--json") {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
}
