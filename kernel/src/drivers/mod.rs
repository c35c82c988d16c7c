//! Device glue: PCI enumeration and MSI-X, the NVMe driver
//! (`dioxide-nvme`) on this kernel's memory, time and interrupts, and
//! virtio-net as a smoltcp device.
pub mod nvme;
pub mod pci;
pub mod virtio_net;
