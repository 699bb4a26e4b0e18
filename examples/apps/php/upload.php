<?php
// Reads the request body as it streams in and answers its length and MD5.
header('Content-Type: application/json');
$in = fopen('php://input', 'rb');
$ctx = hash_init('md5');
$n = 0;
while (!feof($in)) {
    $chunk = fread($in, 1 << 16);
    if ($chunk === false) {
        break;
    }
    $n += strlen($chunk);
    hash_update($ctx, $chunk);
}
echo json_encode(['bytes' => $n, 'md5' => hash_final($ctx)]), "\n";
