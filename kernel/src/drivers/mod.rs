//! Device glue: PCI enumeration and MSI-X, the NVMe driver
//! (`dioxide-nvme`) on this kernel's memory, time and interrupts, and the
//! NICs: virtio-net as a smoltcp device, igb (`dioxide-igb`) as one queue
//! pair per core.
pub mod igb;
pub mod nvme;
pub mod pci;
pub mod virtio_net;
