//! Host tools on dxfs images: mkfs from a directory, fsck, ls, cat.

use crate::{io_err, Error};
use dioxide_dxfs::format::{S_IFDIR, S_IFMT};
use dioxide_dxfs::mkfs::{self, Node, NodeKind, Options, Source, Tree};
use dioxide_dxfs::{BlockDevice, BlockDeviceMut, DevCode, DevError, Fs};
use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An image file as a block device (512-byte sectors).
pub struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with(path, false)
    }
    /// Opens an image for reading, and for writing with `write`.
    pub fn open_with(path: &Path, write: bool) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::Disk {
                path: path.into(),
                why: e.to_string(),
            })?;
        let size = file
            .metadata()
            .map_err(io_err(format!("stat {}", path.display())))?
            .len();
        Ok(FileDevice { file, size })
    }
    pub fn create(path: &Path, size: u64) -> Result<Self, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::Disk {
                path: path.into(),
                why: e.to_string(),
            })?;
        file.set_len(size)
            .map_err(io_err(format!("size {}", path.display())))?;
        Ok(FileDevice { file, size })
    }
}

impl BlockDevice for FileDevice {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.size / 512 * 512
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| dev_error(offset, &e))
    }
}

impl BlockDeviceMut for FileDevice {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| dev_error(offset, &e))
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.file.sync_data().map_err(|e| dev_error(0, &e))
    }
}

/// An image file's I/O error at the dxfs device boundary: the kind as the
/// reason, the OS error number (when there is one) as the code.
fn dev_error(offset: u64, e: &std::io::Error) -> DevError {
    use std::io::ErrorKind as K;
    let reason = match e.kind() {
        K::UnexpectedEof => "image file shorter than expected",
        K::WriteZero => "image file accepted no more bytes",
        K::OutOfMemory => return DevError::NoMemory,
        K::PermissionDenied => "permission denied",
        K::Interrupted => "interrupted",
        K::StorageFull => "no space left on the host device",
        K::FileTooLarge => "file too large",
        K::InvalidInput => "invalid argument",
        _ => "I/O error on the image file",
    };
    DevError::Io {
        offset,
        reason,
        code: e.raw_os_error().map(DevCode::Errno),
    }
}

fn fs_err(path: &Path) -> impl Fn(dioxide_dxfs::Error) -> Error + '_ {
    move |e| Error::Disk {
        path: path.into(),
        why: e.to_string(),
    }
}

/// Parses sizes like `4096`, `64K`, `100M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s}: unknown size suffix (K, M, G, T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s}: not a size"))
}

/// The data ranges of a file (SEEK_DATA / SEEK_HOLE), so that holes stay holes.
fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            // SEEK_DATA unsupported here: the whole file is data.
            return vec![(0, size)];
        }
        let data = data as u64;
        // SAFETY: lseek on the file descriptor `f` owns (open for this
        // call); no memory is passed.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    out
}

struct HostSource {
    paths: Vec<PathBuf>,
    open: Option<(u64, File)>,
}

impl Source for HostSource {
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        if id >= self.paths.len() as u64 {
            // A volume (`mkfs --volume`): zeroes.
            buf.fill(0);
            return Ok(());
        }
        if self.open.as_ref().map(|(i, _)| *i) != Some(id) {
            let p = &self.paths[id as usize];
            let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            self.open = Some((id, f));
        }
        let Some((_, f)) = &self.open else {
            return Err("no file".into());
        };
        f.read_exact_at(buf, offset).map_err(|e| {
            format!(
                "{}: {e} (did the file shrink?)",
                self.paths[id as usize].display()
            )
        })
    }
}

/// Walks `dir` into a mkfs tree. Symbolic links and special files are skipped
/// with a warning (dxfs stores regular files and directories).
fn scan(dir: &Path) -> Result<(Tree, Vec<PathBuf>, u64), Error> {
    let mut tree = Tree { nodes: vec![] };
    let mut paths = Vec::new();
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    let mut bytes = 0u64;
    let meta = std::fs::metadata(dir).map_err(io_err(format!("{}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", dir.display())));
    }
    fn node_attrs(n: &mut Node, m: &std::fs::Metadata) {
        n.perm = (m.mode() & 0o7777) as u16;
        n.mtime = m.mtime();
        n.mtime_nsec = m.mtime_nsec() as u32;
        n.uid = m.uid();
        n.gid = m.gid();
    }
    let mut root = Node::dir(vec![]);
    node_attrs(&mut root, &meta);
    tree.nodes.push(root);
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((path, idx)) = stack.pop() {
        let rd = std::fs::read_dir(&path).map_err(io_err(format!("read {}", path.display())))?;
        let mut children = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io_err(format!("read {}", path.display())))?;
            let p = ent.path();
            let name = match ent.file_name().into_string() {
                Ok(n) => n,
                Err(n) => {
                    eprintln!(
                        "dioxide mkfs: skipping {}: name is not UTF-8",
                        Path::new(&n).display()
                    );
                    continue;
                }
            };
            let m =
                std::fs::symlink_metadata(&p).map_err(io_err(format!("stat {}", p.display())))?;
            if m.is_dir() {
                let i = tree.nodes.len();
                let mut n = Node::dir(vec![]);
                node_attrs(&mut n, &m);
                tree.nodes.push(n);
                children.push((name, i));
                stack.push((p, i));
            } else if m.is_file() {
                let key = (m.dev(), m.ino());
                if m.nlink() > 1 {
                    if let Some(&i) = seen.get(&key) {
                        children.push((name, i));
                        continue;
                    }
                }
                let f = File::open(&p).map_err(io_err(format!("open {}", p.display())))?;
                let ranges = data_ranges(&f, m.len());
                bytes += ranges.iter().map(|r| r.1).sum::<u64>();
                let i = tree.nodes.len();
                let mut n = Node::file(m.len(), ranges, paths.len() as u64);
                node_attrs(&mut n, &m);
                paths.push(p);
                tree.nodes.push(n);
                seen.insert(key, i);
                children.push((name, i));
            } else {
                eprintln!(
                    "dioxide mkfs: skipping {}: not a regular file or directory",
                    p.display()
                );
            }
        }
        children.sort();
        if let NodeKind::Dir(c) = &mut tree.nodes[idx].kind {
            *c = children;
        }
    }
    Ok((tree, paths, bytes))
}

/// `--volume NAME:SIZE`: a file of SIZE bytes (a multiple of 4 KiB, the
/// smallest block size; `parse_size` units) named NAME at the root.
pub fn parse_volume(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:SIZE (vol:1G)"))?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.len() > 255 {
        return Err(format!("{name:?}: a volume's name is one path component"));
    }
    let size = parse_size(size)?;
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(format!(
            "{s:?}: a volume's size is a non-zero multiple of 4 KiB"
        ));
    }
    Ok((name.into(), size))
}

/// Adds `volumes` at the root of `tree`: sparse files of their sizes (one
/// hole each). The appliance's write path allocates their blocks as they
/// are first written, unwritten until their data is on the device (so a
/// power cut shows zeroes, never a block's old bytes), and overwrites
/// them in place after. [`mkfs_with`] leaves room for them in the image.
fn add_volumes(
    tree: &mut Tree,
    volumes: &[(String, u64)],
    first_source: u64,
    block_size: u32,
) -> Result<(), Error> {
    for (k, (name, size)) in volumes.iter().enumerate() {
        if !size.is_multiple_of(block_size as u64) {
            return Err(Error::Usage(format!(
                "--volume {name}: {size} bytes is not a multiple of the block size ({block_size})"
            )));
        }
        let NodeKind::Dir(children) = &tree.nodes[0].kind else {
            return Err(Error::Usage("mkfs: the root is not a directory".into()));
        };
        if children.iter().any(|(n, _)| n == name) {
            return Err(Error::Usage(format!(
                "--volume {name}: the directory already has an entry of that name"
            )));
        }
        let i = tree.nodes.len();
        tree.nodes
            .push(Node::file(*size, Vec::new(), first_source + k as u64));
        if let NodeKind::Dir(children) = &mut tree.nodes[0].kind {
            children.push((name.clone(), i));
            children.sort();
        }
    }
    Ok(())
}

/// `dioxide mkfs IMG --from DIR`.
pub fn mkfs(
    img: &Path,
    from: &Path,
    size: Option<u64>,
    block_size: u32,
    label: &str,
) -> Result<i32, Error> {
    mkfs_with(img, Some(from), &[], size, block_size, label)
}

/// `dioxide mkfs IMG [--from DIR] [--volume NAME:SIZE]...`: the tree of
/// `from` (or an empty root) and the volumes at its root.
pub fn mkfs_with(
    img: &Path,
    from: Option<&Path>,
    volumes: &[(String, u64)],
    size: Option<u64>,
    block_size: u32,
    label: &str,
) -> Result<i32, Error> {
    let t0 = Instant::now();
    let (mut tree, paths, _data_bytes) = match from {
        Some(dir) => scan(dir)?,
        None => (
            Tree {
                nodes: vec![Node::dir(vec![])],
            },
            Vec::new(),
            0,
        ),
    };
    add_volumes(&mut tree, volumes, paths.len() as u64, block_size)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut uuid = [0u8; 16];
    let seed = (now as u64) ^ (std::process::id() as u64) << 32 ^ t0.elapsed().as_nanos() as u64;
    let mut rng = dioxide_testkit::Rng::new(seed);
    rng.fill(&mut uuid);
    let opts = Options {
        block_size,
        size,
        label: label.into(),
        uuid,
        now,
        log_blocks: None,
    };
    let mut plan = mkfs::plan(&tree, &opts)
        .map_err(|e| Error::Usage(format!("mkfs {}: {e}", img.display())))?;
    if size.is_none() && !volumes.is_empty() {
        // Room for the volumes' blocks and their extent trees (one node per
        // 169 extents; at worst one extent per 4 blocks, written sparsely).
        let bytes: u64 = volumes.iter().map(|(_, s)| *s).sum();
        let grown = Options {
            size: Some(plan.image_bytes() + bytes + bytes / 256 + (1 << 20)),
            ..opts.clone()
        };
        plan = mkfs::plan(&tree, &grown)
            .map_err(|e| Error::Usage(format!("mkfs {}: {e}", img.display())))?;
    }
    // The image file is sparse: free space costs the host nothing.
    let mut dev = FileDevice::create(img, plan.image_bytes())?;
    let mut src = HostSource { paths, open: None };
    let tty = std::io::stderr().is_terminal();
    let mut last = Instant::now();
    let mut drew_bar = false;
    let mut progress = |done: u64, total: u64| {
        if tty && total > 64 << 20 && last.elapsed().as_millis() > 200 {
            last = Instant::now();
            drew_bar = true;
            let pct = done * 100 / total.max(1);
            let bar: String = (0..40)
                .map(|i| if i * 100 / 40 < pct { '#' } else { '.' })
                .collect();
            eprint!("\r[{bar}] {pct:3}% {} / {} MiB", done >> 20, total >> 20);
        }
    };
    let r = mkfs::write(&tree, &plan, &opts, &mut src, &mut dev, &mut progress);
    if drew_bar {
        eprintln!();
    }
    let summary = match r {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(img);
            return Err(Error::Usage(format!("mkfs {}: {e}", img.display())));
        }
    };
    dev.file
        .sync_all()
        .map_err(io_err(format!("sync {}", img.display())))?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "dioxide mkfs: {}: {} files, {} directories, {:.1} MiB of data; {} of {} blocks of {} bytes used, {} of {} inodes; {:.2} s ({:.0} MiB/s)",
        img.display(),
        summary.files,
        summary.dirs,
        summary.data_bytes as f64 / (1 << 20) as f64,
        summary.used_blocks,
        summary.blocks,
        summary.block_size,
        summary.used_inodes,
        summary.inodes,
        secs,
        summary.data_bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    Ok(0)
}

/// `dioxide fsck [--repair] IMG`: 0 clean, 4 errors found, 8 operational
/// error (like e2fsck). With `--repair`, a committed transaction the commit
/// log holds is written home first (the writable mount's replay).
pub fn fsck(img: &Path, repair: bool) -> Result<i32, Error> {
    let mut dev = match FileDevice::open_with(img, repair) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dioxide fsck: {e}");
            return Ok(8);
        }
    };
    if let Ok(fs) = dioxide_dxfs::Fs::mount(&dev) {
        if let Some(seq) = fs.log_seq() {
            println!(
                "{}: commit log: transaction {seq} committed, {} block(s){}",
                img.display(),
                fs.logged_blocks(),
                if repair {
                    ", writing them home"
                } else {
                    " read through the log (--repair writes them home)"
                }
            );
        }
    }
    if repair {
        match dioxide_dxfs::WritableFs::mount(&mut dev) {
            Ok(w) if w.replayed() > 0 => {
                println!("{}: replayed {} block(s)", img.display(), w.replayed())
            }
            Ok(_) => {}
            Err(e) => println!("{}: cannot replay the commit log: {e}", img.display()),
        }
    }
    let r = dioxide_dxfs::fsck::check(&dev);
    for p in &r.problems {
        println!("{}: {p}", img.display());
    }
    if r.clean() {
        println!(
            "{}: clean, {}/{} inodes, {}/{} blocks, {} files, {} directories",
            img.display(),
            r.used_inodes,
            r.inode_count,
            r.used_blocks,
            r.block_count,
            r.files,
            r.dirs
        );
        Ok(0)
    } else {
        println!("{}: {} problem(s) found", img.display(), r.problems.len());
        Ok(4)
    }
}

fn mode_string(mode: u16) -> String {
    let mut s = String::with_capacity(10);
    s.push(if mode & S_IFMT == S_IFDIR { 'd' } else { '-' });
    for shift in [6, 3, 0] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// `dioxide ls IMG [PATH]`.
pub fn ls(img: &Path, path: &str) -> Result<i32, Error> {
    let dev = FileDevice::open(img)?;
    let fs = Fs::mount(&dev).map_err(fs_err(img))?;
    let ino = fs.resolve(path).map_err(fs_err(img))?;
    let f = fs.open(ino).map_err(fs_err(img))?;
    let mut out = std::io::stdout().lock();
    let line = |out: &mut dyn Write, inode: &dioxide_dxfs::format::Inode, name: &str| {
        let _ = writeln!(
            out,
            "{} {:3} {:5} {:5} {:12} {}{}",
            mode_string(inode.mode),
            inode.links,
            inode.uid,
            inode.gid,
            inode.size,
            name,
            if inode.is_dir() { "/" } else { "" }
        );
    };
    if !f.inode.is_dir() {
        line(&mut out, &f.inode, path);
        return Ok(0);
    }
    let mut entries = fs.readdir(&f).map_err(fs_err(img))?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for e in entries {
        match fs.inode(e.ino) {
            Ok(i) => line(&mut out, &i, &e.name),
            Err(err) => {
                let _ = writeln!(out, "?????????? {}: {err}", e.name);
            }
        }
    }
    Ok(0)
}

/// `dioxide cat IMG PATH`.
pub fn cat(img: &Path, path: &str) -> Result<i32, Error> {
    let dev = FileDevice::open(img)?;
    let fs = Fs::mount(&dev).map_err(fs_err(img))?;
    let ino = fs.resolve(path).map_err(fs_err(img))?;
    let f = fs.open(ino).map_err(fs_err(img))?;
    if f.inode.is_dir() {
        return Err(Error::Disk {
            path: img.into(),
            why: format!("{path}: is a directory"),
        });
    }
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < f.size() {
        let n = fs.read(&f, off, &mut buf).map_err(fs_err(img))?;
        if n == 0 {
            break;
        }
        if let Err(e) = out.write_all(&buf[..n]) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(Error::Io {
                context: "write stdout".into(),
                source: e,
            });
        }
        off += n as u64;
    }
    Ok(0)
}
