(component

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

  ;; ---- The main module: the agent itself, one memory of 1 page(s) ----
  (core module $main
    (memory (export "memory") 1)
    ;; String literals (addresses are fixed by the generator).
    (data (i32.const 64) "ping")
    (data (i32.const 68) "pong")
    (data (i32.const 72) "grow-all ")
    (data (i32.const 81) "grow-tables ")
    (data (i32.const 93) "grown")
    (data (i32.const 98) "unknown")
    (data (i32.const 105) "bad number")
    (data (i32.const 115) "memory-sizes")
    (data (i32.const 127) "table-sizes")

    ;; The bump allocator's next free byte; reset at the end of every call.
    (global $heap (mut i32) (i32.const 1024))

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
      (i32.store8 (i32.const 16) (local.get $tag))
      (i32.store (i32.const 20) (local.get $ptr))
      (i32.store (i32.const 24) (local.get $len))
      ;; The call is over for the guest: free everything it allocated.
      (global.set $heap (i32.const 1024))
      (i32.const 16))

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
    )

    ;; Grow every table of the component by `n` elements, in order; trap at
    ;; the first refusal.
    (func $grow-tables (param $n i32)
    )

    ;; Append the size in pages of every memory to the heap, in `grow-all`
    ;; order, separated by spaces.
    (func $memory-sizes
      ;; The main module's own memory.
      (call $write-u32 (memory.size))
    )

    ;; Append the size in elements of every table to the heap, in order,
    ;; separated by spaces.
    (func $table-sizes
    )

    ;; handle-message: func(message: string) -> result<string, string>
    (func (export "handle-message") (param $ptr i32) (param $len i32) (result i32)
      (local $n i64) (local $start i32)
      ;; ping -> ok("pong")
      (if (call $equals (local.get $ptr) (local.get $len) (i32.const 64) (i32.const 4))
        (then (return (call $reply (i32.const 0) (i32.const 68) (i32.const 4)))))
      ;; grow-all <pages> -> ok("grown"), or a trap
      (if (call $starts-with (local.get $ptr) (local.get $len) (i32.const 72) (i32.const 9))
        (then
          (local.set $n (call $argument (local.get $ptr) (local.get $len) (i32.const 72) (i32.const 9)))
          (if (i64.lt_s (local.get $n) (i64.const 0))
            (then (return (call $reply (i32.const 1) (i32.const 105) (i32.const 10)))))
          (call $grow-all (i32.wrap_i64 (local.get $n)))
          (return (call $reply (i32.const 0) (i32.const 93) (i32.const 5)))))
      ;; grow-tables <n> -> ok("grown"), or a trap
      (if (call $starts-with (local.get $ptr) (local.get $len) (i32.const 81) (i32.const 12))
        (then
          (local.set $n (call $argument (local.get $ptr) (local.get $len) (i32.const 81) (i32.const 12)))
          (if (i64.lt_s (local.get $n) (i64.const 0))
            (then (return (call $reply (i32.const 1) (i32.const 105) (i32.const 10)))))
          (call $grow-tables (i32.wrap_i64 (local.get $n)))
          (return (call $reply (i32.const 0) (i32.const 93) (i32.const 5)))))
      ;; memory-sizes -> ok("<pages> <pages> ...")
      (if (call $equals (local.get $ptr) (local.get $len) (i32.const 115) (i32.const 12))
        (then
          (local.set $start (global.get $heap))
          (call $memory-sizes)
          (return (call $reply (i32.const 0)
            (local.get $start) (i32.sub (global.get $heap) (local.get $start))))))
      ;; table-sizes -> ok("<elements> <elements> ...")
      (if (call $equals (local.get $ptr) (local.get $len) (i32.const 127) (i32.const 11))
        (then
          (local.set $start (global.get $heap))
          (call $table-sizes)
          (return (call $reply (i32.const 0)
            (local.get $start) (i32.sub (global.get $heap) (local.get $start))))))
      ;; anything else -> err("unknown")
      (call $reply (i32.const 1) (i32.const 98) (i32.const 7)))

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
      (global.set $heap (i32.const 1024))))
  (core instance $main (instantiate $main
  ))

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
)
