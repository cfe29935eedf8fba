(component
  (core module $a (memory 1))
  (core module $b (memory 1))
  (core module $c (memory 1))
  (core instance (instantiate $a))
  (core instance (instantiate $b))
  (core instance (instantiate $c))
)