//! Block layer glue: the dxfs filesystem mounted on the NVMe namespace
//! (its metadata reads go through the driver's raw commands; file data
//! through the DIO engine in `drivers::nvme`).
pub mod disk;
