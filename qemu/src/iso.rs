//! The bootable ISO: GRUB for BIOS and UEFI loading the kernel through
//! multiboot2, with the kernel's command line in `grub.cfg`.
//!
//! `grub-mkrescue` makes a hybrid image: an El Torito BIOS entry
//! (`eltorito.img`, no emulation), an El Torito UEFI entry (a FAT `efi.img`
//! made with mtools' `mformat`) and an MBR + GPT, so that the same file boots
//! from a CD-ROM, BMC virtual media or a USB stick it was `dd`'d to. Only the
//! GRUB modules the menu needs are installed (4.6 MB instead of 23 MB).
//!
//! The kernel's arguments pass two parsers: GRUB's script lexer reads
//! `grub.cfg` (so `$`, `;`, `"`, `\`, `'`, `{`, `#`... are quoted here,
//! [`grub_word`]), then GRUB's multiboot2 loader joins the words again for
//! the kernel, putting a backslash before `\`, `'` and `"`
//! ([`kernel_view`]): the kernel's own parser splits on spaces and takes
//! words as they are, so arguments with those three characters do not
//! reach it unchanged.

use crate::{io_err, Error};
use std::path::Path;
use std::process::Command;

/// GRUB's i386-pc CD boot sector (package grub-pc-bin), from which
/// grub-mkrescue makes the ISO's El Torito image `/boot/grub/i386-pc/eltorito.img`
/// (there is no eltorito.img in the package).
pub const BIOS_CDBOOT: &str = "/usr/lib/grub/i386-pc/cdboot.img";
/// GRUB's x86_64 EFI multiboot2 module (package grub-efi-amd64-bin).
pub const EFI_MULTIBOOT2: &str = "/usr/lib/grub/x86_64-efi/multiboot2.mod";
/// The partition-map modules the EFI image's early config loads (written by
/// grub-mkrescue from this list; a module missing from the ISO is an
/// "error: file ... not found" line on the console).
const EFI_PARTMAPS: &str = "/usr/lib/grub/x86_64-efi/partmap.lst";

/// The GRUB modules installed on the ISO (besides the partition maps).
const MODULES: &[&str] = &[
    "normal",
    "multiboot2",
    "serial",
    "terminal",
    "all_video",
    "iso9660",
    "part_msdos",
    "part_gpt",
];

/// Where the kernel lies on the ISO.
pub const KERNEL_ON_ISO: &str = "/boot/dioxide.elf";

/// What [`build`] made.
#[derive(Clone, Debug)]
pub struct Built {
    /// How the kernel was stripped of debug information (`objcopy` or
    /// `llvm-objcopy`), or why it was not (then the ISO holds the ELF as
    /// built: it boots the same, GRUB only loads more bytes).
    pub strip: Result<&'static str, String>,
    /// Size of the ISO in bytes.
    pub bytes: u64,
}

/// Splits a `--cmdline` string into the kernel's words (it splits on
/// whitespace itself).
pub fn words(cmdline: &str) -> Vec<String> {
    cmdline.split_whitespace().map(String::from).collect()
}

/// One word quoted for GRUB's script lexer, so that it is one argument
/// with exactly these bytes: as it is when it has only characters without
/// meaning to GRUB, else in single quotes (in which nothing is special but
/// the closing quote; a `'` in the word becomes `'\''`).
pub fn grub_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'.' | b',' | b':' | b'/' | b'=' | b'+' | b'-' | b'@' | b'%'
                )
        });
    if plain {
        return w.to_string();
    }
    format!("'{}'", w.replace('\'', r"'\''"))
}

/// The command line the kernel receives when GRUB's multiboot2 loader is
/// given `words` (GRUB's `grub_create_loader_cmdline`): the words joined by
/// spaces, `\`, `'` and `"` each preceded by a backslash, and a word holding
/// a space put in double quotes.
pub fn kernel_view(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let mut s = String::with_capacity(w.len() + 2);
            let space = w.contains(' ');
            if space {
                s.push('"');
            }
            for c in w.chars() {
                if matches!(c, '\\' | '\'' | '"') {
                    s.push('\\');
                }
                s.push(c);
            }
            if space {
                s.push('"');
            }
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The words whose bytes GRUB changes on their way to the kernel (see
/// [`kernel_view`]).
pub fn altered_words(words: &[String]) -> Vec<&str> {
    words
        .iter()
        .filter(|w| w.contains(['\\', '\'', '"', ' ']))
        .map(String::as_str)
        .collect()
}

/// `grub.cfg`: the console on COM1 (115200 8N1) and the screen, a video
/// driver loaded (on UEFI GRUB hands over a GOP framebuffer only then), and
/// one menu entry booting the kernel with `words`, chosen after
/// `timeout_s` seconds (0: at once, no menu drawn).
pub fn grub_cfg(words: &[String], timeout_s: u32) -> String {
    let mut line = format!("multiboot2 {KERNEL_ON_ISO}");
    for w in words {
        line.push(' ');
        line.push_str(&grub_word(w));
    }
    format!(
        "# Written by `dioxide image`: the console is COM1 (115200 8N1) and the screen.\n\
         insmod all_video\n\
         serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         set timeout={timeout_s}\n\
         set default=0\n\
         menuentry \"dioxide\" {{\n    {line}\n    boot\n}}\n"
    )
}

/// A program that must be there: it is run with `arg` (its version), and
/// its absence is an error naming the package.
fn need_program(program: &str, arg: &str, package: &'static str) -> Result<(), Error> {
    match Command::new(program).arg(arg).output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Missing {
            what: format!("{program} (not on PATH)"),
            package,
        }),
        Err(source) => Err(Error::Spawn {
            program: program.into(),
            hint: package,
            source,
        }),
    }
}

/// A file that must be there, from `package`.
pub fn need_file(path: &str, what: &str, package: &'static str) -> Result<(), Error> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(Error::Missing {
            what: format!("{what} ({path})"),
            package,
        })
    }
}

/// Checks that everything [`build`] runs is installed: grub-mkrescue,
/// xorriso, mformat and GRUB's BIOS and UEFI platform files (without the
/// latter grub-mkrescue silently leaves that platform out of the ISO).
pub fn check_tools() -> Result<(), Error> {
    need_program("grub-mkrescue", "--version", "grub-common")?;
    need_program("xorriso", "-version", "xorriso")?;
    need_program("mformat", "--version", "mtools")?;
    need_file(BIOS_CDBOOT, "GRUB's BIOS CD boot image", "grub-pc-bin")?;
    need_file(
        EFI_MULTIBOOT2,
        "GRUB's UEFI multiboot2 module",
        "grub-efi-amd64-bin",
    )
}

/// Copies `elf` to `out` without its debug information: `objcopy
/// --strip-debug` (binutils), else `llvm-objcopy`; else a plain copy, and
/// the reason.
pub fn strip(elf: &Path, out: &Path) -> Result<Result<&'static str, String>, Error> {
    let mut why = Vec::new();
    for tool in ["objcopy", "llvm-objcopy"] {
        match Command::new(tool)
            .arg("--strip-debug")
            .arg(elf)
            .arg(out)
            .output()
        {
            Ok(o) if o.status.success() => return Ok(Ok(tool)),
            Ok(o) => why.push(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => why.push(format!("no {tool}")),
            Err(e) => why.push(format!("{tool}: {e}")),
        }
    }
    std::fs::copy(elf, out).map_err(io_err(format!(
        "copy {} to {}",
        elf.display(),
        out.display()
    )))?;
    Ok(Err(format!(
        "{} (apt-get install binutils); the ISO holds the unstripped ELF",
        why.join(", ")
    )))
}

/// The modules to install: [`MODULES`] and the EFI partition maps.
fn modules() -> String {
    let mut m: Vec<String> = MODULES.iter().map(|s| s.to_string()).collect();
    if let Ok(list) = std::fs::read_to_string(EFI_PARTMAPS) {
        for p in list.split_whitespace() {
            if !m.iter().any(|x| x == p) {
                m.push(p.to_string());
            }
        }
    }
    m.join(" ")
}

/// Makes the ISO `out` booting `kernel` with `words` after a menu of
/// `timeout_s` seconds. The tree it is made from lives in a temporary
/// directory removed on return.
pub fn build(kernel: &Path, words: &[String], timeout_s: u32, out: &Path) -> Result<Built, Error> {
    check_tools()?;
    if !kernel.is_file() {
        return Err(Error::Usage(format!(
            "kernel {}: not a file",
            kernel.display()
        )));
    }
    let tree = tempfile::Builder::new()
        .prefix("dioxide-iso-")
        .tempdir()
        .map_err(io_err("create a temporary directory for the ISO tree"))?;
    let grub = tree.path().join("boot").join("grub");
    std::fs::create_dir_all(&grub).map_err(io_err(format!("create {}", grub.display())))?;
    let elf = tree.path().join(KERNEL_ON_ISO.trim_start_matches('/'));
    let strip = strip(kernel, &elf)?;
    let cfg = grub.join("grub.cfg");
    std::fs::write(&cfg, grub_cfg(words, timeout_s))
        .map_err(io_err(format!("write {}", cfg.display())))?;
    // grub-mkrescue writes through xorriso, which refuses to overwrite
    // some existing files: it writes a new file in the temporary tree's
    // directory, renamed over `out` once complete, so that a failed build
    // leaves an existing image as it was.
    let staged = tree.path().with_extension("iso");
    let o = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&staged)
        .arg(format!("--install-modules={}", modules()))
        .args(["--fonts=", "--locales=", "--themes="])
        .arg(tree.path())
        .args(["--", "-volid", "DIOXIDE"])
        .output()
        .map_err(|source| Error::Spawn {
            program: "grub-mkrescue".into(),
            hint: "apt-get install grub-common",
            source,
        })?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&staged);
        return Err(Error::Iso(format!(
            "grub-mkrescue failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    // A rename within one filesystem, else a copy (the temporary directory
    // may be on another one).
    if std::fs::rename(&staged, out).is_err() {
        let copied = std::fs::copy(&staged, out);
        let _ = std::fs::remove_file(&staged);
        copied.map_err(io_err(format!("write {}", out.display())))?;
    }
    let bytes = std::fs::metadata(out)
        .map_err(io_err(format!("grub-mkrescue made no {}", out.display())))?
        .len();
    Ok(Built { strip, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn plain_words_stay_as_they_are() {
        for x in [
            "net.ip=192.168.1.20/24",
            "log=debug",
            "bench.qd=1,16",
            "a@b%c:d+e-f",
        ] {
            assert_eq!(grub_word(x), x);
        }
    }

    #[test]
    fn words_with_meaning_to_grub_are_single_quoted() {
        assert_eq!(grub_word("x=$HOME"), "'x=$HOME'");
        assert_eq!(grub_word("a;b"), "'a;b'");
        assert_eq!(grub_word("{c}"), "'{c}'");
        assert_eq!(grub_word("#d"), "'#d'");
        assert_eq!(grub_word(r#"q="a\b"#), r#"'q="a\b'"#);
        assert_eq!(grub_word("it's"), r"'it'\''s'");
        assert_eq!(grub_word("''"), r"''\'''\'''");
        assert_eq!(grub_word("ünï"), "'ünï'");
        assert_eq!(grub_word(""), "''");
    }

    #[test]
    fn the_kernel_sees_backslashes_before_quotes_and_backslashes() {
        let words = w(&[
            "selftest=calibrate",
            "x=$HOME;y",
            r#"q="a\b"#,
            "it's",
            "{c}",
        ]);
        assert_eq!(
            kernel_view(&words),
            r#"selftest=calibrate x=$HOME;y q=\"a\\b it\'s {c}"#
        );
        assert_eq!(altered_words(&words), vec![r#"q="a\b"#, "it's"]);
        assert_eq!(kernel_view(&w(&["b=x y"])), r#""b=x y""#);
        assert_eq!(kernel_view(&[]), "");
    }

    #[test]
    fn grub_cfg_has_the_serial_console_and_one_entry() {
        let cfg = grub_cfg(&words("log=debug  net.ip=10.0.0.5/24 x=$y"), 5);
        assert!(cfg.contains("serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"));
        assert!(cfg.contains("terminal_input serial console\nterminal_output serial console\n"));
        assert!(cfg.contains("insmod all_video\n"));
        assert!(cfg.contains("set timeout=5\n"));
        assert!(cfg.contains(
            "menuentry \"dioxide\" {\n    multiboot2 /boot/dioxide.elf log=debug net.ip=10.0.0.5/24 'x=$y'\n    boot\n}\n"
        ));
        assert!(grub_cfg(&[], 0).contains("    multiboot2 /boot/dioxide.elf\n"));
    }

    #[test]
    fn a_missing_file_names_its_package() {
        let e = need_file(
            "/nonexistent/eltorito.img",
            "GRUB's BIOS boot image",
            "grub-pc-bin",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "GRUB's BIOS boot image (/nonexistent/eltorito.img) is missing: install the Debian package grub-pc-bin (./dx setup installs it)"
        );
        let e = need_program("dioxide-no-such-program", "--version", "nothing").unwrap_err();
        assert!(
            e.to_string()
                .contains("dioxide-no-such-program (not on PATH) is missing"),
            "{e}"
        );
    }
}
