//! Any byte string as a dxfs image: mount, walk, read every file, fsck.
//! Nothing may panic, hang or allocate without bound.
#![no_main]

use dioxide_dxfs::{fsck, Fs, MemDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut image = data.to_vec();
    // Whole sectors, at least a superblock's worth.
    image.resize(image.len().max(4096).div_ceil(512) * 512, 0);
    let dev = MemDevice::from_vec(image, 512);
    if let Ok(fs) = Fs::mount(&dev) {
        if let Ok(entries) = fs.walk() {
            for e in entries {
                if let Ok(f) = fs.open(e.ino) {
                    let mut buf = vec![0u8; (f.size() as usize).min(1 << 16)];
                    let _ = fs.read(&f, 0, &mut buf);
                }
            }
        }
    }
    let _ = fsck::check(&dev);
});
