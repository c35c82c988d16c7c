//! Controller bring-up and admin commands.

use crate::cmd::{cns, SubmissionEntry};
use crate::error::NvmeError;
use crate::hal::{Dma, Hal, Mmio, PAGE_SIZE};
use crate::identify::{ControllerInfo, Namespace};
use crate::queue::{DataBuf, QueuePair};
use crate::regs::{self, Cap};
use alloc::vec::Vec;

/// How the driver sets up a controller.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Admin queue entries.
    pub admin_entries: u16,
    /// Deadline of admin commands.
    pub admin_timeout_ms: u64,
    /// Deadline of I/O commands.
    pub io_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_entries: 32,
            admin_timeout_ms: 5_000,
            io_timeout_ms: 5_000,
        }
    }
}

/// An enabled controller with its admin queue.
pub struct Controller<H: Hal, M: Mmio> {
    hal: H,
    mmio: M,
    cap: Cap,
    version: u32,
    config: Config,
    admin: QueuePair<H, M>,
    info: ControllerInfo,
    scratch: Dma,
}

/// Polls `CSTS` until `RDY == want`, bounded by CAP.TO.
fn wait_ready<H: Hal, M: Mmio>(hal: &H, mmio: &M, cap: Cap, want: bool) -> Result<(), NvmeError> {
    let timeout_ms = cap.timeout_ms().max(500);
    let start = hal.now_ns();
    let deadline = start.saturating_add(timeout_ms * 1_000_000);
    loop {
        let csts = mmio.read32(regs::CSTS);
        if csts == u32::MAX {
            return Err(NvmeError::DeviceGone);
        }
        if want && csts & regs::CSTS_CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        if (csts & regs::CSTS_RDY != 0) == want {
            return Ok(());
        }
        if hal.now_ns() >= deadline {
            return Err(NvmeError::NotReady {
                enable: want,
                waited_ms: timeout_ms,
            });
        }
        hal.relax();
    }
}

/// Identify through `admin` into the DMA page `scratch`.
fn identify_raw<H: Hal, M: Mmio>(
    admin: &mut QueuePair<H, M>,
    scratch: &Dma,
    cns: u32,
    nsid: u32,
) -> Result<[u8; 4096], NvmeError> {
    let buf = DataBuf {
        addr: scratch.virt.as_ptr() as usize,
        len: PAGE_SIZE,
    };
    // SAFETY: `scratch` is a DMA page owned by the caller that the CPU does not
    // touch until `execute` returns.
    unsafe { admin.execute(SubmissionEntry::identify(cns, nsid), Some(buf))? };
    let mut out = [0u8; 4096];
    // SAFETY: the command completed; `scratch` is one readable page. The device
    // wrote it, so it is read volatile.
    unsafe {
        let src = scratch.virt.as_ptr();
        for (i, b) in out.iter_mut().enumerate() {
            *b = core::ptr::read_volatile(src.add(i));
        }
    }
    Ok(out)
}

impl<H: Hal, M: Mmio> Controller<H, M> {
    /// Resets the controller, sets up the admin queue, enables it and reads
    /// Identify Controller. Every wait is bounded (CAP.TO, command deadlines).
    pub fn init(hal: H, mmio: M, config: Config) -> Result<Self, NvmeError> {
        let cap = Cap(mmio.read64(regs::CAP));
        if cap.0 == u64::MAX {
            return Err(NvmeError::DeviceGone);
        }
        let version = mmio.read32(regs::VS);
        if !cap.nvm_command_set() {
            return Err(NvmeError::Unsupported("NVM command set not in CAP.CSS"));
        }
        if cap.min_page_size() > PAGE_SIZE || cap.max_page_size() < PAGE_SIZE {
            return Err(NvmeError::Unsupported("4 KiB memory pages"));
        }
        log::debug!(target: "nvme", "CAP {:#018x} VS {:#010x}", cap.0, version);

        // Disable first: firmware or a previous run may have left it enabled.
        let cc = mmio.read32(regs::CC);
        if cc & regs::CC_EN != 0 {
            mmio.write32(regs::CC, cc & !regs::CC_EN);
        }
        wait_ready(&hal, &mmio, cap, false)?;

        let admin_entries = config
            .admin_entries
            .clamp(2, cap.max_queue_entries().min(4096) as u16);
        let admin = QueuePair::new(
            hal.clone(),
            mmio.clone(),
            0,
            admin_entries,
            cap.doorbell_stride(),
            config.admin_timeout_ms * 1_000_000,
            PAGE_SIZE,
            None,
        )?;
        let q = (admin_entries - 1) as u32;
        mmio.write32(regs::AQA, (q << 16) | q);
        mmio.write64(regs::ASQ, admin.sq_phys());
        mmio.write64(regs::ACQ, admin.cq_phys());
        // NVM command set, 4 KiB pages, round robin, 64/16-byte entries.
        mmio.write32(
            regs::CC,
            regs::CC_EN | regs::CC_IOSQES_64 | regs::CC_IOCQES_16,
        );
        wait_ready(&hal, &mmio, cap, true)?;

        let scratch = hal.dma_alloc(PAGE_SIZE).ok_or(NvmeError::NoMemory)?;
        let mut admin = admin;
        let data = identify_raw(&mut admin, &scratch, cns::CONTROLLER, 0)?;
        let info = ControllerInfo::parse(&data, cap.min_page_size())?;
        let ctrl = Controller {
            hal,
            mmio,
            cap,
            version,
            config,
            admin,
            info,
            scratch,
        };
        log::info!(
            target: "nvme",
            "controller {:04x} model {:?} serial {:?} fw {:?} version {}.{} mdts {} namespaces {}",
            ctrl.info.vendor,
            ctrl.info.model.as_str(),
            ctrl.info.serial.as_str(),
            ctrl.info.firmware.as_str(),
            version >> 16,
            (version >> 8) & 0xff,
            ctrl.info.mdts_bytes.map_or(0, |b| b / 1024),
            ctrl.info.namespaces
        );
        Ok(ctrl)
    }

    pub fn cap(&self) -> Cap {
        self.cap
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }
    pub fn admin(&mut self) -> &mut QueuePair<H, M> {
        &mut self.admin
    }

    /// Largest transfer of one command: MDTS, bounded by one PRP list page.
    pub fn max_transfer(&self) -> usize {
        self.info
            .mdts_bytes
            .unwrap_or(usize::MAX)
            .min(crate::queue::MAX_TRANSFER_PRP_LIST)
    }

    /// Runs Identify with `cns` and returns the 4 KiB data structure.
    pub fn identify(&mut self, cns: u32, nsid: u32) -> Result<[u8; 4096], NvmeError> {
        identify_raw(&mut self.admin, &self.scratch, cns, nsid)
    }

    /// The active namespace ids (Identify CNS 2), ascending.
    pub fn active_namespaces(&mut self) -> Result<Vec<u32>, NvmeError> {
        let data = self.identify(cns::ACTIVE_NAMESPACES, 0)?;
        Ok(data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&id| id != 0)
            .collect())
    }

    /// Identify Namespace `nsid`.
    pub fn namespace(&mut self, nsid: u32) -> Result<Namespace, NvmeError> {
        let data = self.identify(cns::NAMESPACE, nsid)?;
        let ns = Namespace::parse(nsid, &data)?;
        log::info!(
            target: "nvme",
            "namespace {nsid}: {} blocks of {} bytes ({} MiB)",
            ns.blocks,
            ns.block_size,
            ns.bytes() >> 20
        );
        Ok(ns)
    }

    /// Set Features / Number of Queues. Returns the I/O queue pairs granted.
    pub fn set_queue_count(&mut self, wanted: u16) -> Result<u16, NvmeError> {
        let wanted = wanted.max(1);
        // SAFETY: no data buffer.
        let dw0 = unsafe {
            self.admin
                .execute(SubmissionEntry::set_num_queues(wanted, wanted), None)?
        };
        let sq = (dw0 & 0xffff) as u16 + 1;
        let cq = (dw0 >> 16) as u16 + 1;
        Ok(sq.min(cq).min(wanted))
    }

    /// Creates I/O queue pair `qid` with `entries` entries; completions signal
    /// MSI-X `vector` when given, else the queue is polled.
    pub fn create_io_queue(
        &mut self,
        qid: u16,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<QueuePair<H, M>, NvmeError> {
        let max = self.cap.max_queue_entries().min(4096);
        if qid == 0 || entries < 2 || entries as u32 > max {
            return Err(NvmeError::BadQueue {
                qid,
                entries: entries as u32,
            });
        }
        let qp = QueuePair::new(
            self.hal.clone(),
            self.mmio.clone(),
            qid,
            entries,
            self.cap.doorbell_stride(),
            self.config.io_timeout_ms * 1_000_000,
            self.max_transfer(),
            vector,
        )?;
        // SAFETY: no data buffer; the queue memory lives in `qp`, which is
        // returned to the caller and never freed while the queue exists.
        unsafe {
            self.admin.execute(
                SubmissionEntry::create_io_cq(qid, entries, qp.cq_phys(), vector),
                None,
            )?;
            if let Err(e) = self.admin.execute(
                SubmissionEntry::create_io_sq(qid, entries, qp.sq_phys(), qid),
                None,
            ) {
                let _ = self.admin.execute(SubmissionEntry::delete_io_cq(qid), None);
                return Err(e);
            }
        }
        log::debug!(target: "nvme", "I/O queue {qid}: {entries} entries, vector {vector:?}");
        Ok(qp)
    }

    /// Deletes I/O queue pair `qp` on the controller. Its memory is leaked on
    /// purpose when deletion fails (the device may still use it).
    pub fn delete_io_queue(&mut self, mut qp: QueuePair<H, M>) -> Result<(), NvmeError> {
        let qid = qp.qid();
        // SAFETY: no data buffers.
        unsafe {
            self.admin
                .execute(SubmissionEntry::delete_io_sq(qid), None)?;
            self.admin
                .execute(SubmissionEntry::delete_io_cq(qid), None)?;
        }
        qp.reset_rings();
        Ok(())
    }

    /// Normal shutdown (CC.SHN), bounded by CAP.TO; then disable.
    pub fn shutdown(&mut self) -> Result<(), NvmeError> {
        let cc = self.mmio.read32(regs::CC);
        self.mmio.write32(regs::CC, cc | regs::CC_SHN_NORMAL);
        let deadline = self
            .hal
            .now_ns()
            .saturating_add(self.cap.timeout_ms().max(500) * 1_000_000);
        loop {
            let csts = self.mmio.read32(regs::CSTS);
            if csts & regs::CSTS_SHST_MASK == regs::CSTS_SHST_DONE {
                break;
            }
            if self.hal.now_ns() >= deadline {
                break;
            }
            self.hal.relax();
        }
        self.disable()
    }

    /// Clears CC.EN and waits for CSTS.RDY to drop: afterwards the device no
    /// longer accesses any queue or buffer.
    pub fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.mmio.read32(regs::CC);
        self.mmio.write32(regs::CC, cc & !regs::CC_EN);
        wait_ready(&self.hal, &self.mmio, self.cap, false)
    }
}
