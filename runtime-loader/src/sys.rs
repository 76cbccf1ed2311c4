//! The bpf(2) commands cnpc needs, called directly: create and fill maps, load programs (the
//! kernel verifier runs here), and run packets through loaded programs (BPF_PROG_TEST_RUN).
//! Pinning objects in bpffs, TCX links (create, update in place: the atomic swap) and object
//! info. Kernel facts from include/uapi/linux/bpf.h.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

pub use cnpc_codegen_bpf::artifacts::fqdn_key;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_MAP_UPDATE_BATCH: i64 = 26;
const BPF_LINK_CREATE: i64 = 28;
const BPF_LINK_UPDATE: i64 = 29;
/// enum bpf_attach_type: tcx hooks (Linux 6.6).
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;
const BPF_PROG_TEST_RUN: i64 = 10;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
/// LPM tries must not be preallocated.
const BPF_F_NO_PREALLOC: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    rest: [u32; 27],
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr.batch` (include/uapi/linux/bpf.h), for BPF_MAP_UPDATE_BATCH.
#[repr(C)]
#[derive(Default)]
struct MapBatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u64; 8],
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

fn bpf<T>(cmd: i64, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr, zero-padded, whose pointers
    // point at live buffers for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Creates an LPM trie (flags as the kernel requires for it).
pub fn lpm_map(key_size: u32, value_size: u32, max_entries: u32) -> std::io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_LPM_TRIE,
        key_size,
        value_size,
        max_entries,
        map_flags: BPF_F_NO_PREALLOC,
        ..Default::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Creates a map of any type (`gen::BPF_MAP_TYPE_*`).
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        ..Default::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// A map a generated program reads could not be created or filled.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} map {map}: {source}")]
pub struct MapError {
    /// `create` or `fill`.
    pub action: &'static str,
    pub map: String,
    #[source]
    pub source: std::io::Error,
}

/// Creates the map `def` describes and fills it with `records` (key, value).
pub fn create_filled(
    def: &cnpc_codegen_bpf::elf::MapDef,
    records: &[cnpc_codegen_bpf::gen::Record],
) -> Result<OwnedFd, MapError> {
    let err = |action| {
        let map = def.name.clone();
        move |source| MapError {
            action,
            map,
            source,
        }
    };
    let fd = create_map(
        def.map_type,
        def.key_size,
        def.value_size,
        def.max_entries,
        def.flags,
    )
    .map_err(err("create"))?;
    // One system call for the whole image where the map type has batch updates (hash maps
    // since Linux 5.6): an ipcache of 5,000 hosts took 5,000 calls, some milliseconds of every
    // generation that changes it. Other types (the LPM trie has no batch operations) and any
    // refusal fall back to one update per record, which gives the same contents.
    if records.len() > 1 && update_batch(&fd, def.key_size, def.value_size, records).is_ok() {
        return Ok(fd);
    }
    for (k, v) in records {
        map_update(&fd, k, v).map_err(err("fill"))?;
    }
    Ok(fd)
}

/// Writes `records` (keys of `key_size`, values of `value_size` bytes) with one
/// BPF_MAP_UPDATE_BATCH.
fn update_batch(
    map: impl AsFd,
    key_size: u32,
    value_size: u32,
    records: &[cnpc_codegen_bpf::gen::Record],
) -> std::io::Result<()> {
    let (key_size, value_size) = (key_size as usize, value_size as usize);
    let mut keys = Vec::with_capacity(records.len() * key_size);
    let mut values = Vec::with_capacity(records.len() * value_size);
    for (k, v) in records {
        if k.len() != key_size || v.len() != value_size {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        keys.extend_from_slice(k);
        values.extend_from_slice(v);
    }
    let count = u32::try_from(records.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = MapBatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    // The kernel reports how many it wrote; fewer than all is a failure to fall back from.
    if attr.count != count {
        return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
    }
    Ok(())
}

/// The value under `key`, if any.
pub fn map_lookup(
    map: impl AsFd,
    key: &[u8],
    value_size: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut value = vec![0u8; value_size];
    let mut attr = MapElemAttr {
        map_fd: map.as_fd().as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `key`; whether it was there.
pub fn map_delete(map: impl AsFd, key: &[u8]) -> std::io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: map.as_fd().as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every key of a hash map (BPF_MAP_GET_NEXT_KEY from a null key on). When the key the walk
/// stands on is deleted meanwhile, the kernel starts over from the first key
/// (kernel/bpf/hashtab.c, `htab_map_get_next_key`); keys seen before are then skipped, so
/// each is returned once.
pub fn map_keys(map: impl AsFd, key_size: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let map = map.as_fd();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut at: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            // A null key asks for the first.
            key: at.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                if seen.insert(next.clone()) {
                    keys.push(next.clone());
                }
                at = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// Every (key, value) of a hash map: its keys ([`map_keys`]), then each one's value; a key
/// deleted in between is left out.
pub fn map_entries(
    map: impl AsFd,
    key_size: usize,
    value_size: usize,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let map = map.as_fd();
    let mut out = Vec::new();
    for key in map_keys(map, key_size)? {
        if let Some(value) = map_lookup(map, &key, value_size)? {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// Writes `value` under `key` (created or replaced: BPF_ANY).
pub fn map_update(map: impl AsFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_fd().as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Loads a program; on rejection returns the verifier log. The first attempt asks for no log:
/// writing the verifier's trace costs more than verifying, so it is fetched only to explain a
/// rejection.
pub fn load(prog_type: u32, code: &[u8]) -> Result<OwnedFd, String> {
    match load_logged(prog_type, code, 0) {
        Ok((fd, _)) => Ok(fd),
        Err(_) => load_logged(prog_type, code, LOG_LEVEL_TRACE).map(|(fd, _)| fd),
    }
}

/// Verifier log levels (include/uapi/linux/bpf.h): 1 the trace (kept for rejections), 4 the
/// statistics line only.
pub const LOG_LEVEL_TRACE: u32 = 1;
pub const LOG_LEVEL_STATS: u32 = 4;

/// Loads a program with the given verifier log level; returns the log with the descriptor.
pub fn load_logged(
    prog_type: u32,
    code: &[u8],
    log_level: u32,
) -> Result<(OwnedFd, String), String> {
    let license = b"GPL\0";
    let mut log = vec![0u8; if log_level == 0 { 0 } else { 1 << 20 }];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: (code.len() / 8) as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size: log.len() as u32,
        log_buf: if log.is_empty() {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        ..Default::default()
    };
    attr.prog_name[..4].copy_from_slice(b"cnpc");
    let result = bpf(BPF_PROG_LOAD, &mut attr);
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).into_owned();
    match result {
        Ok(fd) => Ok((owned(fd), text)),
        Err(e) => Err(format!("{e}: {text}")),
    }
}

/// Runs `packet` through the program; returns its return value and the `skb->mark` it left.
pub fn test_run(prog: &OwnedFd, packet: &[u8]) -> std::io::Result<(u32, u32)> {
    test_run_repeat(prog, packet, 1).map(|(code, mark, _)| (code, mark))
}

/// Runs `packet` through the program `repeat` times in the kernel; returns the last return
/// value, the `skb->mark` and the kernel's mean time per run in nanoseconds.
pub fn test_run_repeat(
    prog: &OwnedFd,
    packet: &[u8],
    repeat: u32,
) -> std::io::Result<(u32, u32, u32)> {
    test_run_with_mark(prog, packet, repeat, 0)
}

/// `sizeof(struct __sk_buff)`, and the offset of its `mark`.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;

/// [`test_run_repeat`] with `skb->mark` set on entry (the kernel copies `mark` from the
/// context it is given, net/bpf/test_run.c `convert___skb_to_skb`): how the proxies' marked
/// traffic is tested.
pub fn test_run_with_mark(
    prog: &OwnedFd,
    packet: &[u8],
    repeat: u32,
    mark: u32,
) -> std::io::Result<(u32, u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    // Test runs accept the context zeroed but for a few fields, `mark` among them.
    let mut ctx_in = [0u8; SK_BUFF_SIZE];
    ctx_in[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&mark.to_le_bytes());
    let mut ctx_out = [0u8; SK_BUFF_SIZE];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: ctx_in.len() as u32,
        ctx_size_out: ctx_out.len() as u32,
        ctx_in: ctx_in.as_ptr() as u64,
        ctx_out: ctx_out.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    let mark = u32::from_le_bytes([
        ctx_out[SK_BUFF_MARK],
        ctx_out[SK_BUFF_MARK + 1],
        ctx_out[SK_BUFF_MARK + 2],
        ctx_out[SK_BUFF_MARK + 3],
    ]);
    Ok((attr.retval, mark, attr.duration))
}

/// Whether kernel tests must run (CI sets CNPC_REQUIRE_KERNEL=1): then a missing capability
/// fails the test instead of skipping it.
pub fn skip_or_fail(reason: &str) {
    if std::env::var("CNPC_REQUIRE_KERNEL").is_ok_and(|v| v == "1") {
        panic!("CNPC_REQUIRE_KERNEL=1 but {reason}");
    }
    // Written to the stderr handle, not through eprintln!, which the test harness captures:
    // a skipped kernel test must show in a plain `cargo test`, not only under --nocapture.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED (kernel test did not run): {reason}"
    );
}

/// Makes sure bpffs is mounted at `path` for tests, mounting it when it is not and this
/// process may (root): a newcomer's `cargo test` as root runs the kernel tests instead of
/// skipping them. The reason when it cannot.
pub fn bpffs_for_tests(path: &std::path::Path) -> Result<(), String> {
    if is_bpffs(path) {
        return Ok(());
    }
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    mount_bpffs(path).map_err(|e| {
        format!(
            "bpffs is not mounted at {} and mounting it failed: {e}",
            path.display()
        )
    })?;
    if is_bpffs(path) {
        Ok(())
    } else {
        Err(format!("bpffs is not mounted at {}", path.display()))
    }
}

/// The consumer side of a BPF ring buffer (kernel/bpf/ringbuf.c): a read-write page holding the
/// consumer position, then read-only the producer position page and the data pages, mapped
/// twice in a row so a record that wraps reads as one.
pub struct RingBuf {
    consumer: *mut u8,
    producer: *const u8,
    size: usize,
    page: usize,
}

// SAFETY: the mappings are process-wide and owned by the RingBuf alone; moving it to another
// thread moves that ownership.
unsafe impl Send for RingBuf {}

impl RingBuf {
    pub fn new(map: &OwnedFd, size: usize) -> std::io::Result<RingBuf> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: mapping a ring buffer map's fd as the kernel documents it; the results are
        // checked against MAP_FAILED and unmapped in Drop.
        let consumer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if consumer == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let producer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page + 2 * size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                page as i64,
            )
        };
        if producer == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(consumer, page) };
            return Err(e);
        }
        Ok(RingBuf {
            consumer: consumer as *mut u8,
            producer: producer as *const u8,
            size,
            page,
        })
    }

    /// Every record produced since the last call.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        const BUSY: u32 = 1 << 31;
        const DISCARD: u32 = 1 << 30;
        let mut out = Vec::new();
        // SAFETY: the positions are u64s at the start of their pages, written by the kernel
        // (producer) and by us (consumer); atomics give the ordering the kernel expects.
        let (cons_pos, prod_pos) = unsafe {
            (
                &*(self.consumer as *const std::sync::atomic::AtomicU64),
                &*(self.producer as *const std::sync::atomic::AtomicU64),
            )
        };
        use std::sync::atomic::Ordering;
        let mut cons = cons_pos.load(Ordering::Acquire);
        let prod = prod_pos.load(Ordering::Acquire);
        while cons < prod {
            let at = self.page + (cons as usize & (self.size - 1));
            // SAFETY: `at` is inside the data area, which is mapped twice so a header and its
            // record never run past the mapping.
            let header =
                unsafe { &*(self.producer.add(at) as *const std::sync::atomic::AtomicU32) }
                    .load(Ordering::Acquire);
            if header & BUSY != 0 {
                break;
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            if header & DISCARD == 0 {
                // SAFETY: as above; the record is `len` bytes after its 8-byte header.
                out.push(
                    unsafe { std::slice::from_raw_parts(self.producer.add(at + 8), len) }.to_vec(),
                );
            }
            cons += ((len + 8 + 7) & !7) as u64;
            cons_pos.store(cons, Ordering::Release);
        }
        out
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.consumer as *mut libc::c_void, self.page);
            libc::munmap(
                self.producer as *mut libc::c_void,
                self.page + 2 * self.size,
            );
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

fn c_path(path: &std::path::Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

/// Pins `fd` (a map, program or link) at `path` on a bpffs mount.
pub fn obj_pin(fd: &OwnedFd, path: &std::path::Path) -> std::io::Result<()> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    pad: u32,
    expected_revision: u64,
    rest: [u64; 4],
}

/// Attaches `prog` to interface `ifindex` at a tcx hook (BPF_TCX_INGRESS or BPF_TCX_EGRESS);
/// the link detaches when its last reference (fd or pin) goes.
pub fn tcx_attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program of a link in one step: a packet runs either the old program or the new.
pub fn link_update(link: &OwnedFd, prog: &OwnedFd) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: buf.len() as u32,
        info: buf.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A link's (id, program id, target ifindex for tcx links). struct bpf_link_info: type, id,
/// prog_id, then the per-type union (tcx: ifindex, attach_type).
pub fn link_info(link: &OwnedFd) -> std::io::Result<(u32, u32, u32)> {
    let mut buf = [0u8; 64];
    info(link, &mut buf)?;
    Ok((u32_at(&buf, 4), u32_at(&buf, 8), u32_at(&buf, 16)))
}

/// The program with this id (a link's [`link_info`] names it): what runs on a hook, for tests
/// and diagnostics.
pub fn prog_by_id(id: u32) -> std::io::Result<OwnedFd> {
    // union bpf_attr for BPF_PROG_GET_FD_BY_ID: prog_id, next_id, open_flags.
    let mut attr = [id, 0, 0];
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

/// A program's id (struct bpf_prog_info: type, id, ...).
pub fn prog_id(prog: &OwnedFd) -> std::io::Result<u32> {
    let mut buf = [0u8; 256];
    info(prog, &mut buf)?;
    Ok(u32_at(&buf, 4))
}

/// The index of the interface named `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Whether `dir` is on a bpffs mount (statfs magic BPF_FS_MAGIC).
pub fn is_bpffs(dir: &std::path::Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(p) = c_path(dir) else { return false };
    // SAFETY: statfs writes into `st`, which lives for the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(p.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts bpffs at `dir` (creating it).
pub fn mount_bpffs(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = c_path(dir)?;
    let fstype = c"bpf";
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            p.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Binds a unix socket at `path` that only root may use (mode 0600): the state directory is
/// made if missing and a stale socket of an earlier run replaced. The loader's event stream and
/// the DNS proxy's learning socket are served this way.
pub fn root_only_socket(
    path: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
