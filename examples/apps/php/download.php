<?php
// ?mib=N: N MiB (at most 64) of a repeating pattern, or ?kib=N: N KiB;
// written as it is made, with no Content-Length (streamed); ?length=1
// says the length.
$bytes = isset($_GET['kib']) ? max(0, min(65536, (int)$_GET['kib'])) << 10
    : max(0, min(64, (int)($_GET['mib'] ?? 1))) << 20;
header('Content-Type: application/octet-stream');
if (isset($_GET['length'])) {
    header('Content-Length: ' . $bytes);
}
$block = str_repeat('0123456789abcdef', 1 << 12); // 64 KiB
for ($left = $bytes; $left > 0; $left -= strlen($block)) {
    echo $left >= strlen($block) ? $block : substr($block, 0, $left);
}
