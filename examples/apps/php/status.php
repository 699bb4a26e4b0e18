<?php
// ?code=N answers N; ?to=/path redirects there; ?log=TEXT writes TEXT to
// the error log (the dispatcher's log, from FCGI_STDERR).
if (isset($_GET['log'])) {
    error_log($_GET['log']);
}
if (isset($_GET['to'])) {
    header('Location: ' . $_GET['to']);
    exit;
}
http_response_code((int)($_GET['code'] ?? 200));
header('X-From: php');
echo "status ", http_response_code(), "\n";
