//! A generator of agent components with an exact shape, written in WAT, for
//! the tests of the per-agent resource limits.
//!
//! [`agent_component`] returns the WAT text of a component that implements
//! the world `supervised-agent` (package `terraphim:agent@0.1.0`): it exports
//! the interface `terraphim:agent/agent@0.1.0` with exactly the WIT types and
//! imports nothing. Give the text to `Runtime::load_bytes`.
//!
//! # Shape
//!
//! The component is made of `1 + extra_memories + extra_tables` core module
//! instances, each module instantiated once:
//!
//! - the main module: one memory of [`Fixture::initial_pages`] pages, no
//!   table, a bump allocator exported as `realloc`, and the agent's exports;
//! - `extra_memories` memory modules, each with one memory of
//!   `initial_pages` pages and the exports `grow: (pages) -> old size or -1`
//!   and `size: () -> pages`;
//! - `extra_tables` table modules, each with one `funcref` table of
//!   [`Fixture::table_initial`] elements and the exports
//!   `grow-table: (elements) -> old size or -1` and `table-size: () -> elements`.
//!
//! So an instance holds exactly `1 + extra_memories` memories and exactly
//! `extra_tables` tables, and nothing else: no WASI, no host import, no
//! adapter module.
//!
//! # Behaviour
//!
//! `init`, `start`, `stop`, `health-check` and `handle-system-message`
//! return `ok`; `terminate` returns. `handle-message` understands:
//!
//! | message             | effect                                                     | reply            |
//! |---------------------|------------------------------------------------------------|------------------|
//! | `ping`              | none                                                       | `ok("pong")`     |
//! | `grow-all <pages>`  | `memory.grow` by `<pages>` every memory, the main one first, then each memory module in order | `ok("grown")` |
//! | `grow-tables <n>`   | `table.grow` by `<n>` every table, in order                | `ok("grown")`    |
//! | `memory-sizes`      | none                                                       | `ok` with the size in pages of every memory, in `grow-all` order, separated by spaces (`"3 3 3"`) |
//! | `table-sizes`       | none                                                       | `ok` with the size in elements of every table, in order, separated by spaces (`""` without tables) |
//! | anything else       | none                                                       | `err("unknown")` |
//!
//! `<pages>` and `<n>` are decimal `u32` written after exactly one space; a
//! malformed number (empty, a non-digit, more than `u32::MAX`) gets
//! `err("bad number")`. A growth that fails (returns -1) executes
//! `unreachable` at once, as a real guest aborts when an allocation fails:
//! the memories or tables after it are not grown, and the call traps.
//!
//! The main module's allocator reuses its heap from the start at the end of
//! every call, so messages and calls never grow the main memory by
//! themselves unless one message is larger than the free part of the initial
//! memory (then `realloc` grows it, trapping if that is refused). The size
//! replies are written to the heap too; the host copies them before the next
//! call can overwrite them.

use std::fmt::Write;

/// The shape of a fixture component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixture {
    /// How many memory modules besides the main module (each adds one
    /// memory).
    pub extra_memories: usize,
    /// How many table modules (each adds one table; the main module has
    /// none).
    pub extra_tables: usize,
    /// Initial size in 64 KiB pages of every memory, the main one included.
    /// At least 1: the main module keeps its strings and return area in the
    /// first page.
    pub initial_pages: u32,
    /// Initial size in elements of every table.
    pub table_initial: u32,
}

impl Default for Fixture {
    /// A main module of one page, nothing else.
    fn default() -> Self {
        Self {
            extra_memories: 0,
            extra_tables: 0,
            initial_pages: 1,
            table_initial: 1,
        }
    }
}

impl Fixture {
    /// How many memories an instance of the fixture holds.
    pub fn memories(&self) -> usize {
        1 + self.extra_memories
    }

    /// How many tables an instance of the fixture holds.
    pub fn tables(&self) -> usize {
        self.extra_tables
    }

    /// How many core instances an instance of the fixture holds.
    pub fn core_instances(&self) -> usize {
        1 + self.extra_memories + self.extra_tables
    }
}

/// Where the lifted functions write their result: tag byte at +0, string
/// pointer at +4, string length at +8.
const RETURN_AREA: u32 = 16;
/// Where the string literals of the main module start.
const LITERALS: u32 = 64;
/// Where the bump allocator starts, past the literals.
const HEAP_BASE: u32 = 1024;

/// The string literals of the main module, in the order they are laid out
/// from [`LITERALS`].
const STRINGS: &[&str] = &[
    "ping",
    "pong",
    "grow-all ",
    "grow-tables ",
    "grown",
    "unknown",
    "bad number",
    "memory-sizes",
    "table-sizes",
];

/// `(address, length)` of `text` in the main module's memory.
fn literal(text: &str) -> (u32, u32) {
    let mut at = LITERALS;
    for s in STRINGS {
        if *s == text {
            return (at, s.len() as u32);
        }
        at += s.len() as u32;
    }
    panic!("{text:?} is not one of the main module's literals");
}

/// `i32.const <address> i32.const <length>` of a literal, as folded WAT.
fn lit(text: &str) -> String {
    let (at, len) = literal(text);
    format!("(i32.const {at}) (i32.const {len})")
}

/// The WAT text of a component implementing `supervised-agent` with the
/// shape and the commands described in the [module documentation](self).
///
/// # Panics
///
/// If `fixture.initial_pages` is 0.
pub fn agent_component(fixture: &Fixture) -> String {
    assert!(
        fixture.initial_pages >= 1,
        "the main module needs at least one page"
    );
    let (last, len) = literal(STRINGS[STRINGS.len() - 1]);
    assert!(last + len <= HEAP_BASE, "the literals overlap the heap");
    let mut wat = String::new();
    wat.push_str("(component\n");
    wat.push_str(WIT_TYPES);
    for i in 0..fixture.extra_memories {
        memory_module(&mut wat, i, fixture.initial_pages);
    }
    for i in 0..fixture.extra_tables {
        table_module(&mut wat, i, fixture.table_initial);
    }
    main_module(&mut wat, fixture);
    wat.push_str(LIFTED_EXPORTS);
    wat.push_str(")\n");
    wat
}

/// The WIT types of `terraphim:agent/types@0.1.0` the agent interface uses,
/// and the function types of the interface.
const WIT_TYPES: &str = r#"
  ;; ---- The WIT types of terraphim:agent/types@0.1.0 ----
  (type $agent-status (variant
    (case "starting") (case "running") (case "stopping") (case "stopped")
    (case "failed" string) (case "restarting")))
  (type $init-args (record
    (field "agent-id" string) (field "supervisor-id" string) (field "config" string)))
  (type $system-message (variant
    (case "shutdown") (case "restart") (case "health-check")
    (case "status-update" $agent-status) (case "supervisor-message" string)))
  (type $terminate-reason (variant
    (case "normal") (case "shutdown") (case "error" string) (case "timeout")
    (case "supervisor-request")))
"#;

/// Memory module number `i`: one memory and `grow`.
fn memory_module(wat: &mut String, i: usize, pages: u32) {
    write!(
        wat,
        r#"
  ;; ---- Memory module {i}: one memory of {pages} page(s) ----
  (core module $memory-{i}
    (memory {pages})
    ;; Grow this module's memory by `pages`: the old size in pages, or -1.
    (func (export "grow") (param $pages i32) (result i32)
      (memory.grow (local.get $pages)))
    ;; The size of this module's memory in pages.
    (func (export "size") (result i32)
      (memory.size)))
  (core instance $memory-{i} (instantiate $memory-{i}))
"#
    )
    .unwrap();
}

/// Table module number `i`: one funcref table and `grow-table`.
fn table_module(wat: &mut String, i: usize, elements: u32) {
    write!(
        wat,
        r#"
  ;; ---- Table module {i}: one funcref table of {elements} element(s) ----
  (core module $table-{i}
    (table $t {elements} funcref)
    ;; Grow this module's table by `n` null elements: the old size, or -1.
    (func (export "grow-table") (param $n i32) (result i32)
      (table.grow $t (ref.null func) (local.get $n)))
    ;; The size of this module's table in elements.
    (func (export "table-size") (result i32)
      (table.size $t)))
  (core instance $table-{i} (instantiate $table-{i}))
"#
    )
    .unwrap();
}

/// The main module, instantiated with every memory and table module.
fn main_module(wat: &mut String, fixture: &Fixture) {
    let pages = fixture.initial_pages;
    write!(
        wat,
        r#"
  ;; ---- The main module: the agent itself, one memory of {pages} page(s) ----
  (core module $main
"#
    )
    .unwrap();
    for i in 0..fixture.extra_memories {
        writeln!(
            wat,
            r#"    (import "memory-{i}" "grow" (func $grow-memory-{i} (param i32) (result i32)))
    (import "memory-{i}" "size" (func $size-memory-{i} (result i32)))"#
        )
        .unwrap();
    }
    for i in 0..fixture.extra_tables {
        writeln!(
            wat,
            r#"    (import "table-{i}" "grow-table" (func $grow-table-{i} (param i32) (result i32)))
    (import "table-{i}" "table-size" (func $size-table-{i} (result i32)))"#
        )
        .unwrap();
    }
    writeln!(wat, r#"    (memory (export "memory") {pages})"#).unwrap();
    wat.push_str("    ;; String literals (addresses are fixed by the generator).\n");
    for s in STRINGS {
        let (at, _) = literal(s);
        writeln!(wat, r#"    (data (i32.const {at}) "{s}")"#).unwrap();
    }
    write!(
        wat,
        r#"
    ;; The bump allocator's next free byte; reset at the end of every call.
    (global $heap (mut i32) (i32.const {HEAP_BASE}))

    ;; cabi_realloc: a bump allocator that grows the memory when a request
    ;; does not fit, and traps when that growth is refused.
    (func $realloc (export "realloc")
      (param $old i32) (param $old-size i32) (param $align i32) (param $new-size i32)
      (result i32)
      (local $ptr i32) (local $end i32) (local $have i32)
      (local.set $ptr (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $ptr) (local.get $new-size)))
      (local.set $have (i32.shl (memory.size) (i32.const 16)))
      (if (i32.gt_u (local.get $end) (local.get $have))
        (then
          (if (i32.eq
                (memory.grow (i32.shr_u
                  (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                  (i32.const 16)))
                (i32.const -1))
            (then unreachable))))
      ;; A reallocation keeps the old contents.
      (memory.copy (local.get $ptr) (local.get $old)
        (select (local.get $old-size) (local.get $new-size)
          (i32.lt_u (local.get $old-size) (local.get $new-size))))
      (global.set $heap (local.get $end))
      (local.get $ptr))

    ;; Write a result<_, string> or result<string, string> into the return
    ;; area: tag (0 ok, 1 err) at +0, string pointer at +4, length at +8.
    (func $reply (param $tag i32) (param $ptr i32) (param $len i32) (result i32)
      (i32.store8 (i32.const {RETURN_AREA}) (local.get $tag))
      (i32.store (i32.const {ret_ptr}) (local.get $ptr))
      (i32.store (i32.const {ret_len}) (local.get $len))
      ;; The call is over for the guest: free everything it allocated.
      (global.set $heap (i32.const {HEAP_BASE}))
      (i32.const {RETURN_AREA}))

    ;; ok(()) of a result<_, string>.
    (func $ok (result i32)
      (call $reply (i32.const 0) (i32.const 0) (i32.const 0)))

    ;; Whether the `len` bytes at `ptr` start with the `lit-len` bytes at `lit`.
    (func $starts-with (param $ptr i32) (param $len i32) (param $lit i32) (param $lit-len i32)
      (result i32)
      (if (i32.lt_u (local.get $len) (local.get $lit-len)) (then (return (i32.const 0))))
      (block $done
        (loop $next
          (br_if $done (i32.eqz (local.get $lit-len)))
          (if (i32.ne (i32.load8_u (local.get $ptr)) (i32.load8_u (local.get $lit)))
            (then (return (i32.const 0))))
          (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
          (local.set $lit (i32.add (local.get $lit) (i32.const 1)))
          (local.set $lit-len (i32.sub (local.get $lit-len) (i32.const 1)))
          (br $next)))
      (i32.const 1))

    ;; Whether the `len` bytes at `ptr` are exactly the `lit-len` bytes at `lit`.
    (func $equals (param $ptr i32) (param $len i32) (param $lit i32) (param $lit-len i32)
      (result i32)
      (if (result i32) (i32.eq (local.get $len) (local.get $lit-len))
        (then (call $starts-with (local.get $ptr) (local.get $len) (local.get $lit) (local.get $lit-len)))
        (else (i32.const 0))))

    ;; The decimal u32 in the `len` bytes at `ptr`, or -1 if they are not one.
    (func $parse-u32 (param $ptr i32) (param $len i32) (result i64)
      (local $acc i64) (local $digit i32)
      (if (i32.eqz (local.get $len)) (then (return (i64.const -1))))
      (loop $next
        (local.set $digit (i32.sub (i32.load8_u (local.get $ptr)) (i32.const 48)))
        (if (i32.gt_u (local.get $digit) (i32.const 9)) (then (return (i64.const -1))))
        (local.set $acc (i64.add
          (i64.mul (local.get $acc) (i64.const 10))
          (i64.extend_i32_u (local.get $digit))))
        (if (i64.gt_u (local.get $acc) (i64.const 0xffffffff)) (then (return (i64.const -1))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (br_if $next (local.tee $len (i32.sub (local.get $len) (i32.const 1)))))
      (local.get $acc))

    ;; The number after the command `lit` in the message, or -1.
    (func $argument (param $ptr i32) (param $len i32) (param $lit i32) (param $lit-len i32)
      (result i64)
      (call $parse-u32
        (i32.add (local.get $ptr) (local.get $lit-len))
        (i32.sub (local.get $len) (local.get $lit-len))))

    ;; Append the decimal digits of `n` to the heap (allocated with realloc).
    (func $write-u32 (param $n i32)
      (local $digits i32) (local $rest i32) (local $at i32)
      ;; How many digits.
      (local.set $digits (i32.const 1))
      (local.set $rest (local.get $n))
      (block $counted
        (loop $count
          (br_if $counted (i32.lt_u (local.get $rest) (i32.const 10)))
          (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
          (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
          (br $count)))
      ;; Write them from the last one.
      (local.set $at (i32.add
        (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (local.get $digits))
        (local.get $digits)))
      (loop $digit
        (local.set $at (i32.sub (local.get $at) (i32.const 1)))
        (i32.store8 (local.get $at)
          (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
        (br_if $digit (local.tee $n (i32.div_u (local.get $n) (i32.const 10))))))

    ;; Append a space to the heap.
    (func $write-space
      (i32.store8
        (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 1))
        (i32.const 32)))

    ;; Grow every memory of the component by `pages`, in order; trap at the
    ;; first refusal.
    (func $grow-all (param $pages i32)
      ;; The main module's own memory.
      (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1)) (then unreachable))
"#,
        ret_ptr = RETURN_AREA + 4,
        ret_len = RETURN_AREA + 8,
    )
    .unwrap();
    for i in 0..fixture.extra_memories {
        writeln!(
            wat,
            "      ;; Memory module {i}.\n      \
             (if (i32.eq (call $grow-memory-{i} (local.get $pages)) (i32.const -1)) (then unreachable))"
        )
        .unwrap();
    }
    wat.push_str(
        r#"    )

    ;; Grow every table of the component by `n` elements, in order; trap at
    ;; the first refusal.
    (func $grow-tables (param $n i32)
"#,
    );
    for i in 0..fixture.extra_tables {
        writeln!(
            wat,
            "      ;; Table module {i}.\n      \
             (if (i32.eq (call $grow-table-{i} (local.get $n)) (i32.const -1)) (then unreachable))"
        )
        .unwrap();
    }
    wat.push_str(
        r#"    )

    ;; Append the size in pages of every memory to the heap, in `grow-all`
    ;; order, separated by spaces.
    (func $memory-sizes
      ;; The main module's own memory.
      (call $write-u32 (memory.size))
"#,
    );
    for i in 0..fixture.extra_memories {
        writeln!(
            wat,
            "      ;; Memory module {i}.\n      \
             (call $write-space) (call $write-u32 (call $size-memory-{i}))"
        )
        .unwrap();
    }
    wat.push_str(
        r#"    )

    ;; Append the size in elements of every table to the heap, in order,
    ;; separated by spaces.
    (func $table-sizes
"#,
    );
    for i in 0..fixture.extra_tables {
        let space = if i == 0 { "" } else { "(call $write-space) " };
        writeln!(
            wat,
            "      ;; Table module {i}.\n      \
             {space}(call $write-u32 (call $size-table-{i}))"
        )
        .unwrap();
    }
    write!(
        wat,
        r#"    )

    ;; handle-message: func(message: string) -> result<string, string>
    (func (export "handle-message") (param $ptr i32) (param $len i32) (result i32)
      (local $n i64) (local $start i32)
      ;; ping -> ok("pong")
      (if (call $equals (local.get $ptr) (local.get $len) {ping})
        (then (return (call $reply (i32.const 0) {pong}))))
      ;; grow-all <pages> -> ok("grown"), or a trap
      (if (call $starts-with (local.get $ptr) (local.get $len) {grow_all})
        (then
          (local.set $n (call $argument (local.get $ptr) (local.get $len) {grow_all}))
          (if (i64.lt_s (local.get $n) (i64.const 0))
            (then (return (call $reply (i32.const 1) {bad_number}))))
          (call $grow-all (i32.wrap_i64 (local.get $n)))
          (return (call $reply (i32.const 0) {grown}))))
      ;; grow-tables <n> -> ok("grown"), or a trap
      (if (call $starts-with (local.get $ptr) (local.get $len) {grow_tables})
        (then
          (local.set $n (call $argument (local.get $ptr) (local.get $len) {grow_tables}))
          (if (i64.lt_s (local.get $n) (i64.const 0))
            (then (return (call $reply (i32.const 1) {bad_number}))))
          (call $grow-tables (i32.wrap_i64 (local.get $n)))
          (return (call $reply (i32.const 0) {grown}))))
      ;; memory-sizes -> ok("<pages> <pages> ...")
      (if (call $equals (local.get $ptr) (local.get $len) {memory_sizes})
        (then
          (local.set $start (global.get $heap))
          (call $memory-sizes)
          (return (call $reply (i32.const 0)
            (local.get $start) (i32.sub (global.get $heap) (local.get $start))))))
      ;; table-sizes -> ok("<elements> <elements> ...")
      (if (call $equals (local.get $ptr) (local.get $len) {table_sizes})
        (then
          (local.set $start (global.get $heap))
          (call $table-sizes)
          (return (call $reply (i32.const 0)
            (local.get $start) (i32.sub (global.get $heap) (local.get $start))))))
      ;; anything else -> err("unknown")
      (call $reply (i32.const 1) {unknown}))

    ;; init: func(args: init-args) -> result<_, string>; the record flattens
    ;; to three (pointer, length) pairs.
    (func (export "init") (param i32 i32 i32 i32 i32 i32) (result i32) (call $ok))
    ;; start, stop, health-check: func() -> result<_, string>
    (func (export "start") (result i32) (call $ok))
    (func (export "stop") (result i32) (call $ok))
    (func (export "health-check") (result i32) (call $ok))
    ;; handle-system-message: func(message: system-message) -> result<_, string>;
    ;; the variant flattens to a discriminant and three joined payload words.
    (func (export "handle-system-message") (param i32 i32 i32 i32) (result i32) (call $ok))
    ;; terminate: func(reason: terminate-reason); a discriminant and a string.
    (func (export "terminate") (param i32 i32 i32)
      (global.set $heap (i32.const {HEAP_BASE}))))
"#,
        ping = lit("ping"),
        pong = lit("pong"),
        grow_all = lit("grow-all "),
        grow_tables = lit("grow-tables "),
        grown = lit("grown"),
        unknown = lit("unknown"),
        bad_number = lit("bad number"),
        memory_sizes = lit("memory-sizes"),
        table_sizes = lit("table-sizes"),
    )
    .unwrap();

    wat.push_str("  (core instance $main (instantiate $main\n");
    for i in 0..fixture.extra_memories {
        writeln!(wat, r#"    (with "memory-{i}" (instance $memory-{i}))"#).unwrap();
    }
    for i in 0..fixture.extra_tables {
        writeln!(wat, r#"    (with "table-{i}" (instance $table-{i}))"#).unwrap();
    }
    wat.push_str("  ))\n");
}

/// The lifted functions and the exported interface instance.
const LIFTED_EXPORTS: &str = r#"
  ;; ---- The interface terraphim:agent/agent@0.1.0, lifted from $main ----
  (func $init (param "args" $init-args) (result (result (error string)))
    (canon lift (core func $main "init")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))
  (func $start (result (result (error string)))
    (canon lift (core func $main "start") (memory (core memory $main "memory"))))
  (func $stop (result (result (error string)))
    (canon lift (core func $main "stop") (memory (core memory $main "memory"))))
  (func $handle-message (param "message" string) (result (result string (error string)))
    (canon lift (core func $main "handle-message")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))
  (func $handle-system-message (param "message" $system-message) (result (result (error string)))
    (canon lift (core func $main "handle-system-message")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))
  (func $health-check (result (result (error string)))
    (canon lift (core func $main "health-check") (memory (core memory $main "memory"))))
  (func $terminate (param "reason" $terminate-reason)
    (canon lift (core func $main "terminate")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))

  (instance $agent
    (export "agent-status" (type $agent-status))
    (export "init-args" (type $init-args))
    (export "system-message" (type $system-message))
    (export "terminate-reason" (type $terminate-reason))
    (export "init" (func $init))
    (export "start" (func $start))
    (export "stop" (func $stop))
    (export "handle-message" (func $handle-message))
    (export "handle-system-message" (func $handle-system-message))
    (export "health-check" (func $health-check))
    (export "terminate" (func $terminate)))
  (export "terraphim:agent/agent@0.1.0" (instance $agent))
"#;
