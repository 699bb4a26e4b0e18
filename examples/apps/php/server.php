<?php
// The CGI variables the request arrived with, as JSON.
header('Content-Type: application/json');
$keys = ['REQUEST_METHOD', 'REQUEST_URI', 'QUERY_STRING', 'SCRIPT_NAME', 'SCRIPT_FILENAME', 'PATH_INFO',
    'DOCUMENT_ROOT', 'DOCUMENT_URI', 'SERVER_PROTOCOL', 'SERVER_NAME', 'SERVER_ADDR', 'SERVER_PORT', 'REMOTE_ADDR',
    'REMOTE_PORT', 'CONTENT_TYPE', 'CONTENT_LENGTH', 'HTTP_HOST', 'HTTP_X_TEST', 'HTTP_COOKIE', 'GATEWAY_INTERFACE'];
$out = [];
foreach ($keys as $k) {
    if (isset($_SERVER[$k])) {
        $out[$k] = $_SERVER[$k];
    }
}
$out['GET'] = $_GET;
$out['POST'] = $_POST;
$out['pid'] = getmypid();
echo json_encode($out, JSON_UNESCAPED_SLASHES | JSON_PRETTY_PRINT), "\n";
